"""Bad images, boxes and parameters get a TypeError/ValueError naming the argument, the
expected and the actual value; value checks happen only where reading is free (CPU)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from momentum_contrast.augment import MoCoV2Augment, _checks
from momentum_contrast.augment import functional as AF

B = 2
ONES, APPLY = torch.ones(B), torch.tensor([True, False])
ORDER = torch.stack([torch.arange(4)] * B)

# every public op, called on an image batch ``x`` with valid other arguments
OPS: dict[str, Callable[[torch.Tensor], object]] = {
    "grayscale": AF.grayscale,
    "adjust_brightness": lambda x: AF.adjust_brightness(x, ONES),
    "adjust_contrast": lambda x: AF.adjust_contrast(x, ONES),
    "adjust_saturation": lambda x: AF.adjust_saturation(x, ONES),
    "adjust_hue": lambda x: AF.adjust_hue(x, 0 * ONES),
    "color_jitter": lambda x: AF.color_jitter(x, ONES, ONES, ONES, 0 * ONES, ORDER),
    "solarize": lambda x: AF.solarize(x, APPLY),
    "hflip": lambda x: AF.hflip(x, APPLY),
    "gaussian_blur": lambda x: AF.gaussian_blur(x, ONES, 3),
    "normalize": lambda x: AF.normalize(x, torch.zeros(3), torch.ones(3)),
}
CLAMPING = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "color_jitter",
    "solarize",
]
BAD_DTYPES = [torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64]


def full(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full((B, 3, 8, 8), value).to(dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [*BAD_DTYPES, torch.uint8])
def test_ops_refuse_non_float_images(op: str, dtype: torch.dtype) -> None:
    with pytest.raises(TypeError) as info:
        OPS[op](full(0.0, dtype))
    assert str(info.value) == f"x must have a floating-point dtype, got {dtype}"


@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_crop_and_recipes_refuse_integer_bool_and_complex_images(dtype: torch.dtype) -> None:
    boxes = torch.tensor([[0, 0, 8, 8]] * B)
    expected = f"images must have a uint8 (0 to 255) or floating-point (0 to 1) dtype, got {dtype}"
    for call in (
        lambda: AF.resized_crop(full(0.0, dtype), boxes, 4),
        lambda: MoCoV2Augment(size=4, blur_p=0.0)(full(0.0, dtype)),
    ):
        with pytest.raises(TypeError) as info:
            call()
        assert str(info.value) == expected
    with pytest.raises(TypeError, match=rf"images\[1\] must have a uint8 .* got {dtype}"):
        AF.resized_crop([full(0.0)[0], full(0.0, dtype)[0]], boxes, 4)


@pytest.mark.parametrize("op", CLAMPING)
@pytest.mark.parametrize("value", [-0.25, 255.0, float("nan")])
def test_clamping_ops_refuse_float_values_outside_the_unit_interval(op: str, value: float) -> None:
    x = full(0.5)
    x[1, 2, 3, 4] = value
    with pytest.raises(ValueError, match=r"x must hold float pixel values in \[0, 1\], got"):
        OPS[op](x)
    OPS[op](full(0.0))  # the edges are in range
    OPS[op](full(1.0))


def test_value_agnostic_ops_accept_any_float_values() -> None:
    normalised = AF.normalize(full(0.0), torch.full((3,), 0.5), torch.full((3,), 0.25))
    assert normalised.min() == -2.0  # outside [0, 1], and legitimately so
    for op in ("grayscale", "hflip", "gaussian_blur", "normalize"):
        assert torch.isfinite(torch.as_tensor(OPS[op](normalised))).all()


def test_crop_and_recipes_refuse_float_images_outside_the_unit_interval() -> None:
    images = full(0.5) * 255  # a 0-255 image passed as float
    message = r"images must hold float pixel values in \[0, 1\], got values in \[127.5, 127.5\]"
    with pytest.raises(ValueError, match=message):
        AF.resized_crop(images, torch.tensor([[0, 0, 8, 8]] * B), 4)
    with pytest.raises(ValueError, match=message):
        MoCoV2Augment(size=4)(images)
    with pytest.raises(ValueError, match=r"images must hold .* got values in \[-1.0, 0.5\]"):
        MoCoV2Augment(size=4)([full(0.5)[0], -full(1.0)[0]])  # a list: checked too


def crop(boxes: list[list[int]], images: torch.Tensor | list[torch.Tensor] | None = None):  # type: ignore[no-untyped-def]
    images = full(0.5)[:1].expand(len(boxes), 3, 8, 8) if images is None else images
    return AF.resized_crop(images, torch.tensor(boxes), 4)


@pytest.mark.parametrize(
    ("box", "fragment"),
    [
        ([-1, 0, 4, 4], "(top -1, left 0, height 4, width 4)"),
        ([0, -2, 4, 4], "(top 0, left -2, height 4, width 4)"),
        ([5, 0, 4, 4], "(top 5, left 0, height 4, width 4)"),  # top + height = 9 > 8
        ([0, 6, 4, 3], "(top 0, left 6, height 4, width 3)"),  # left + width = 9 > 8
        ([0, 0, 0, 4], "(top 0, left 0, height 0, width 4)"),
        ([0, 0, 4, -3], "(top 0, left 0, height 4, width -3)"),
        ([0, 0, 9, 8], "(top 0, left 0, height 9, width 8)"),
        ([2**62, 0, 2**62, 8], f"(top {2**62}, left 0, height {2**62}, width 8)"),
        ([0, 2**62, 8, 2**62], f"(top 0, left {2**62}, height 8, width {2**62})"),
    ],  # the last two: top + height overflowed int64, a NaN sample and no error
    ids=["top<0", "left<0", "bottom>H", "right>W", "height=0", "width<0", "taller", "tall", "wide"],
)
def test_resized_crop_refuses_boxes_outside_the_image(box: list[int], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        crop([[0, 0, 8, 8], box])
    message = str(info.value)
    assert message.startswith(f"boxes[1] = {fragment} must lie inside image 1"), message
    assert "of height 8 and width 8" in message


def test_resized_crop_accepts_boxes_touching_every_edge() -> None:
    out = crop([[0, 0, 8, 8], [7, 7, 1, 1], [0, 4, 8, 4]])
    assert out.shape == (3, 3, 4, 4) and torch.isfinite(out).all()


def test_boxes_are_checked_against_each_images_own_size() -> None:
    images = [full(0.5)[0], full(0.5)[0, :, :4, :6]]  # the second is 4 x 6, padded to 8 x 8
    assert crop([[0, 0, 8, 8], [0, 0, 4, 6]], images).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"boxes\[1\] .* image 1 of height 4 and width 6"):
        crop([[0, 0, 8, 8], [0, 0, 5, 6]], images)  # inside the padding, not the image


@pytest.mark.parametrize(
    ("boxes", "error", "message"),
    [
        (torch.zeros(B, 4), TypeError, "boxes must have an integer dtype (e.g. torch.int64)"),
        (torch.ones(B, 4, dtype=torch.bool), TypeError, "got torch.bool"),
        ([[0, 0, 8, 8]] * B, TypeError, "boxes must be an integer tensor of shape (2, 4)"),
        (torch.zeros(B, 4, dtype=torch.long, device="meta"), ValueError, "images, cpu, got meta"),
    ],
    ids=["float", "bool", "list", "device"],
)
def test_bad_box_tensors(boxes: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        AF.resized_crop(full(0.5), boxes, 4)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_where_reading_is_not_free_a_bad_box_gives_nan_without_a_sync(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stands in for a GPU: the values are not read, and only the bad sample is NaN."""
    monkeypatch.setattr(_checks, "_free_to_read", lambda x: False)
    out = crop([[0, 0, 8, 8], [5, 0, 4, 4], [2, 2, 4, 4]])
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
    hot = full(0.5) * 255
    assert AF.adjust_brightness(hot, ONES).max() == 1.0  # not read: clamped as documented


def test_per_sample_arguments_are_named() -> None:
    x = full(0.5)
    with pytest.raises(
        ValueError, match=r"saturation must be a tensor of shape \(2,\), got \(3,\)"
    ):
        AF.color_jitter(x, ONES, ONES, torch.ones(3), 0 * ONES, ORDER)
    with pytest.raises(ValueError, match=r"order must be an integer tensor of shape \(2, 4\)"):
        AF.color_jitter(x, ONES, ONES, ONES, 0 * ONES, ORDER.float())
    with pytest.raises(TypeError, match=r"apply must be a bool tensor of shape \(2,\), got torch"):
        AF.solarize(x, torch.ones(B))
    with pytest.raises(ValueError, match=r"flip must have shape \(2,\), got \(3,\)"):
        AF.resized_crop(x, torch.tensor([[0, 0, 8, 8]] * B), 4, flip=torch.ones(3).bool())
    with pytest.raises(ValueError, match=r"sigma must be a tensor of shape \(2,\), got \(1,\)"):
        AF.gaussian_blur(x, torch.ones(1), 3)
    with pytest.raises(ValueError, match=r"x must have 1 or 3 channels, got shape \(2, 2, 8, 8\)"):
        AF.grayscale(x[:, :2])
    with pytest.raises(ValueError, match=r"std must be a tensor of shape \(3,\), got \(2,\)"):
        AF.normalize(x, torch.zeros(3), torch.ones(2))


def test_per_sample_and_per_channel_arguments_elsewhere_are_named() -> None:
    """On another device than the images, torch's error named no argument; a complex mean
    was torch's NotImplementedError, a bool one taken as 0 and 1."""
    x, meta = full(0.5), torch.device("meta")
    elsewhere: list[tuple[str, Callable[[], object]]] = [
        ("factor", lambda: AF.adjust_brightness(x, ONES.to(meta))),
        ("hue", lambda: AF.color_jitter(x, ONES, ONES, ONES, (0 * ONES).to(meta), ORDER)),
        ("order", lambda: AF.color_jitter(x, ONES, ONES, ONES, 0 * ONES, ORDER.to(meta))),
        ("apply", lambda: AF.color_jitter(x, ONES, ONES, ONES, 0 * ONES, ORDER, APPLY.to(meta))),
        ("apply", lambda: AF.solarize(x, APPLY.to(meta))),
        ("apply", lambda: AF.hflip(x, APPLY.to(meta))),
        ("sigma", lambda: AF.gaussian_blur(x, ONES.to(meta), 3)),
        ("mean", lambda: AF.normalize(x, torch.zeros(3, device=meta), torch.ones(3))),
        ("std", lambda: AF.normalize(x, torch.zeros(3), torch.ones(3, device=meta))),
    ]
    for name, call in elsewhere:
        with pytest.raises(ValueError, match=rf"^{name} must be on the device of x, cpu, got meta"):
            call()
    box = torch.tensor([[0, 0, 8, 8]] * B)
    with pytest.raises(ValueError, match=r"^flip must be on the device of images, cpu, got meta$"):
        AF.resized_crop(x, box, 4, flip=APPLY.to(meta))
    for dtype in (torch.complex64, torch.bool):
        with pytest.raises(TypeError, match=rf"^mean must be a real tensor, got dtype {dtype}$"):
            AF.normalize(x, torch.zeros(3, dtype=dtype), torch.ones(3))


def test_checks_compile_into_one_graph_and_skip_the_value_read() -> None:
    """Under torch.compile the value check is left out (a read would break the graph)."""
    torch._dynamo.reset()
    compiled = torch.compile(AF.adjust_brightness, fullgraph=True, backend="aot_eager")
    x = full(0.5)
    assert torch.equal(compiled(x, 0.5 * ONES), AF.adjust_brightness(x, 0.5 * ONES))
    assert compiled(full(2.0), ONES).max() == 1.0  # not read: clamped, as on a GPU


def test_integer_resample_dtypes_and_empty_images_are_refused() -> None:
    """An integer resample dtype cut the fractional resize weights to 0 (a wrong image, no
    error); a 0-pixel image gave a constant image or NaN."""
    u8 = torch.randint(0, 256, (2, 3, 12, 12), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"resample_dtype must be a floating-point torch\.dtype"):
        MoCoV2Augment(size=4, resample_dtype=torch.int32)
    with pytest.raises(
        TypeError, match=r"dtype must be a floating-point torch\.dtype \(.*\), got torch\.uint8"
    ):
        AF.resized_crop(u8, torch.tensor([[0, 0, 8, 8]] * B), 4, dtype=torch.uint8)
    with pytest.raises(
        ValueError, match=r"images must be at least 1 x 1 pixels, got shape \(2, 3, 0, 12\)"
    ):
        MoCoV2Augment(size=4)(u8[:, :, :0])
    with pytest.raises(ValueError, match=r"images\[1\] must be at least 1 x 1 pixels"):
        MoCoV2Augment(size=4)([u8[0], u8[1, :, :, :0]])
    with pytest.raises(ValueError, match=r"std finite > 0; got .*nan"):
        MoCoV2Augment(size=4, std=(0.2, float("nan"), 0.2))
    for kernel in ("23", True):
        with pytest.raises(TypeError, match="blur_kernel_size must be an int"):
            MoCoV2Augment(size=4, blur_kernel_size=kernel)  # type: ignore[arg-type]


def test_color_jitter_orders_must_be_permutations_and_factors_real() -> None:
    """A row with a repeated op (and so a missing one) gave another jitter, with no error."""
    x = full(0.5)
    with pytest.raises(
        ValueError, match=r"permutation of 0, 1, 2, 3 in every row, got \[\[0, 0, 0, 0\]"
    ):
        AF.color_jitter(x, ONES, ONES, ONES, 0 * ONES, torch.zeros(B, 4, dtype=torch.long))
    factors = (1.3 * ONES, 0.7 * ONES, 1.1 * ONES, 0.1 * ONES)
    narrow = AF.color_jitter(x, *factors, ORDER.flip(1).to(torch.uint8))  # any integer dtype
    assert torch.equal(narrow, AF.color_jitter(x, *factors, ORDER.flip(1)))
    with pytest.raises(TypeError, match=r"brightness must be a real tensor, got dtype torch\.bool"):
        AF.color_jitter(x, ONES.bool(), ONES, ONES, 0 * ONES, ORDER)


def test_op_parameters_torchvision_refuses_are_refused_on_the_cpu() -> None:
    """Values torchvision refuses (a negative sigma blurred nothing, a NaN one gave a NaN
    image; a negative brightness gave black; a zero std gave NaN) raise, naming them."""
    x = torch.rand(B, 3, 12, 12)
    cases: list[tuple[Callable[[], object], str]] = [
        (
            lambda: AF.gaussian_blur(x, torch.tensor([-2.0, 2.0]), 7),
            r"sigma must hold values in \[0",
        ),
        (
            lambda: AF.gaussian_blur(x, torch.tensor([float("nan"), 2.0]), 7),
            "sigma must hold finite",
        ),
        (lambda: AF.adjust_brightness(x, torch.tensor([-0.5, 1.0])), "factor must hold values"),
        (lambda: AF.adjust_contrast(x, torch.tensor([-0.5, 1.0])), "factor must hold values"),
        (lambda: AF.adjust_saturation(x, torch.tensor([1.0, -1.0])), "factor must hold values"),
        (lambda: AF.adjust_hue(x, torch.tensor([0.9, 0.0])), r"\[-0.5, 0.5\], got values in"),
        (lambda: AF.solarize(x, torch.ones(B, dtype=torch.bool), float("nan")), "threshold"),
        (lambda: AF.solarize(x, torch.ones(B, dtype=torch.bool), 2.0), r"threshold must be in"),
        (
            lambda: AF.normalize(x, torch.zeros(3), torch.tensor([1.0, 0.0, 1.0])),
            "std must hold no 0",
        ),
        (lambda: AF.normalize(x, torch.tensor([0.0, float("nan"), 0.0]), torch.ones(3)), "mean"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    torch.testing.assert_close(AF.gaussian_blur(x, torch.zeros(B), 7), x)  # sigma 0 is fine
    # what torchvision takes stays taken: a 0-d tensor threshold, a negative std
    on = torch.ones(B, dtype=torch.bool)
    assert torch.equal(AF.solarize(x, on, torch.tensor(0.5)), AF.solarize(x, on, 0.5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"threshold must hold values in \[0.0, 1.0\]"):
        AF.solarize(x, on, torch.tensor(1.5))  # type: ignore[arg-type]
    flipped = AF.normalize(x, torch.zeros(3), -torch.ones(3))
    torch.testing.assert_close(flipped, -x)


def test_op_arguments_of_the_wrong_type_are_refused_by_name() -> None:
    x, gray = torch.rand(B, 3, 12, 12), torch.rand(B, 1, 12, 12)
    for kernel_size in (7.5, True, "7"):
        with pytest.raises(TypeError, match="kernel_size must be an int"):
            AF.gaussian_blur(x, torch.ones(B), kernel_size)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="threshold must be a real number"):
        AF.solarize(x, torch.ones(B, dtype=torch.bool), "0.5")  # type: ignore[arg-type]
    for op in (AF.adjust_saturation, AF.adjust_hue):  # one channel: checked all the same
        with pytest.raises(
            ValueError, match=r"factor must be a tensor of shape \(2,\), got \(5,\)"
        ):
            op(gray, torch.ones(5))
        with pytest.raises(ValueError, match="factor must be a tensor of shape"):
            op(gray, "abc")  # type: ignore[arg-type]


def test_grayscale_of_one_channel_is_a_copy() -> None:
    gray = torch.rand(B, 1, 4, 4)
    out = AF.grayscale(gray)
    assert torch.equal(out, gray) and out.data_ptr() != gray.data_ptr()
    out.mul_(0)
    assert gray.abs().max() > 0  # the caller's images are untouched


def test_hue_in_bfloat16_is_as_close_as_its_rounding() -> None:
    """In bfloat16 the hue sector ``6 h`` kept 2 bits of fraction (errors of 0.05); the
    rotation now runs in float32 and only the result is rounded."""
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    shift = torch.linspace(-0.5, 0.5, 8)
    exact = AF.adjust_hue(x.float(), shift)
    error = (AF.adjust_hue(x, shift).float() - exact).abs().max()
    assert error <= 2**-8  # one bfloat16 step below 1 (was 0.049)


def test_recipe_arguments_that_cannot_work_are_refused_by_name() -> None:
    """Infinite ranges (a ratio up to inf made every crop the whole image), a NaN or
    non-numeric mean, a seed for a generator, and a blur wider than the views."""
    from momentum_contrast.augment import TwoViewAugment, ViewRecipe

    with pytest.raises(ValueError, match=r"view_one ratio must satisfy 0 < low <= high < inf"):
        TwoViewAugment(ViewRecipe(ratio=(0.75, float("inf"))), ViewRecipe(), size=24)
    with pytest.raises(ValueError, match="view_two brightness must be finite and >= 0"):
        TwoViewAugment(ViewRecipe(), ViewRecipe(brightness=float("inf")), size=24)
    with pytest.raises(ValueError, match="mean finite"):
        MoCoV2Augment(size=24, mean=(float("nan"), 0.5, 0.5))
    for mean in (("a", 0.5, 0.5), 0.5):
        with pytest.raises(TypeError, match="mean must be real numbers, one per channel"):
            MoCoV2Augment(size=24, mean=mean)  # type: ignore[arg-type]
    images = torch.rand(B, 3, 40, 48)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None, got int"):
        MoCoV2Augment(size=24)(images, generator=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="blur_kernel_size 23 needs size > 11, got size 8"):
        MoCoV2Augment(size=8)(images)
    one, _ = MoCoV2Augment(size=8, blur_kernel_size=3)(images)  # a fitting kernel runs
    assert one.shape == (B, 3, 8, 8) and torch.isfinite(one).all()
