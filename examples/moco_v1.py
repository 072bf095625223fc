"""MoCo v1 pre-training: the v2 script with the v1 paper's choices (linear head, T 0.07,
no blur, colour jitter always applied, step learning-rate schedule at epochs 120 and 160).

    python examples/moco_v1.py                                   # built-in shapes, CPU or GPU
    python examples/moco_v1.py --data /data/imagenet --arch resnet50           # one GPU
    torchrun --nproc-per-node 8 examples/moco_v1.py --data /data/imagenet --arch resnet50
"""

from moco_v2 import main

if __name__ == "__main__":
    main("v1")
