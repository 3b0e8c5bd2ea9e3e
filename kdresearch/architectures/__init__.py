"""The CIFAR benchmark networks of the knowledge-distillation suites RepDistiller
(github.com/HobbitLong/RepDistiller) and mdistiller (github.com/megvii-research/mdistiller),
written to this project's model contract (`kdresearch.models.Network`).

One module per family (`resnet`, `wrn`, `vgg`, `mobilenetv2`, `shufflenetv1`, `shufflenetv2`);
each config name of the suites (e.g. `resnet8x4`, `wrn_40_2`, `MobileNetV2`) is a callable there
taking `num_classes`, which is what `conf/model/<name>.yaml` points its `_target_` at.
Parameter names equal the suites', so their checkpoints load with a strict `load_state_dict`.

`imagenet` holds the suites' ImageNet networks: torchvision's `resnet18`, `resnet34`, `resnet50`
and `mobilenet_v2` (torchvision's parameter names, so its weight files load unchanged) and
mdistiller's `mobilenet_v1`, with shape facts for the configured input size (`image_size`).
"""
