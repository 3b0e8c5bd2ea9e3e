"""Datasets and their batches: the protocol and splits, CIFAR, synthetic data, image folders,
ImageNet and Tiny-ImageNet, batching and augmentation.

The loaders are re-exported here because config groups name them by these paths
(`kdresearch.data.load_cifar10`, ...), and so do the configs stored in earlier runs.
"""

from kdresearch.data.cifar import load_cifar10, load_cifar100
from kdresearch.data.image_folder import load_image_folder
from kdresearch.data.imagenet import load_imagenet
from kdresearch.data.splits import Dataset, ImageData
from kdresearch.data.synthetic import make_synthetic
from kdresearch.data.tiny_imagenet import load_tiny_imagenet

__all__ = ["Dataset", "ImageData", "load_cifar10", "load_cifar100", "load_image_folder", "load_imagenet",
           "load_tiny_imagenet", "make_synthetic"]
