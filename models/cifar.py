"""CIFAR-style VGG16-BN and ResNet20 (32x32 inputs) with SeaM mask layers (plain layers turned into mask layers by
``layers.mask.convert_to_masks``, the path every CNN takes).

The architectures and state-dict keys are those of chenyaofo/pytorch-cifar-models, so its released CIFAR-10/100
checkpoints (plain state dicts) load unchanged: VGG16-BN has biased 3x3 convolutions and a 512-512-classes
classifier (``features.N.*``, ``classifier.{0,3,6}.*``); ResNet20 has bias-free convolutions
(``conv1``, ``bn1``, ``layerS.B.{conv1,bn1,conv2,bn2}``, ``layerS.0.downsample.{0,1}``, ``fc``).

Every constructor also takes
- ``head_classes=k``: appends SeaM's module head ``module_head = Sequential(ReLU, Linear(fc_out, k))`` after the
  original output layer (the re-engineered module's task output);
- ``widths=[...]``: the channel counts of a physically pruned network (what ``models.extract`` produces), so an
  extracted module is rebuilt from its config dict alone. ``vgg16_bn``: 16 ints = 13 conv widths, the two hidden
  classifier widths, the classifier output width. ``resnet20``: 13 ints = the 3 residual-stream widths (one per
  stage), the 9 block-internal widths (conv1 of each block), the fc output width.

Channel-level masks (``enable_masks('channel')``): a switched-off filter must give exactly 0 after its BatchNorm
(otherwise BN turns the zero into a constant and the channel cannot be removed). The converter does this as for any
CNN: ``convert_to_masks(..., example=...)`` finds each BatchNorm fed by a conv with hooks on one 32x32 forward and
makes it a ``GatedBatchNorm2d`` multiplying its output by that conv's binary channel gate (absent at weight
granularity). The state-dict keys stay chenyaofo's.
"""
import torch
import torch.nn as nn

from layers.mask import MaskLinear, convert_to_masks

VGG16_CFG = [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M']
RESNET20_BLOCKS = 3  # blocks per stage
RESNET20_STAGE_WIDTHS = (16, 32, 64)


def _convert(model):
    """The converter every CNN takes: mask layers (the module head stays plain), and each BatchNorm found after a
    conv by one forward of a 32x32 zero image gated by that conv's channel mask."""
    convert_to_masks(model, skip=('module_head.1',), example=torch.zeros(1, 3, 32, 32))


def _check_widths(widths, n, what):
    if widths is None:
        return None
    widths = [int(w) for w in widths]
    if len(widths) != n or min(widths) < 1:
        raise ValueError(f"widths for {what} must be {n} positive ints, got {widths}")
    return widths


class VGG(nn.Module):
    """VGG16-BN for 32x32 images. x (N, 3, 32, 32) -> logits (N, num_classes) (or (N, head_classes))."""

    def __init__(self, num_classes=10, head_classes=None, widths=None, init_weights=True):
        super().__init__()
        n_conv = sum(1 for v in VGG16_CFG if v != 'M')
        widths = _check_widths(widths, n_conv + 3, 'vgg16_bn')
        if widths is None:
            widths = [v for v in VGG16_CFG if v != 'M'] + [512, 512, num_classes]
        layers, c_in, i = [], 3, 0
        for v in VGG16_CFG:
            if v == 'M':
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, widths[i], 3, padding=1), nn.BatchNorm2d(widths[i]), nn.ReLU(inplace=True)]
                c_in, i = widths[i], i + 1
        self.features = nn.Sequential(*layers)
        h1, h2, out = widths[n_conv:]
        self.classifier = nn.Sequential(
            nn.Linear(c_in, h1), nn.ReLU(True), nn.Dropout(),
            nn.Linear(h1, h2), nn.ReLU(True), nn.Dropout(),
            nn.Linear(h2, out),
        )
        if head_classes is not None:
            self.module_head = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(out, int(head_classes)))
        _convert(self)
        if init_weights:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, MaskLinear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.classifier(torch.flatten(self.features(x), 1))
        if hasattr(self, 'module_head'):
            x = self.module_head(x)
        return x


class BasicBlock(nn.Module):
    """x (N, in_planes, H, W) -> (N, out_planes, H/stride, W/stride); ``mid`` is conv1's width."""

    def __init__(self, in_planes, mid, out_planes, stride=1, downsample=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, out_planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_planes))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet20 for 32x32 images. x (N, 3, 32, 32) -> logits (N, num_classes) (or (N, head_classes))."""

    def __init__(self, num_classes=10, head_classes=None, widths=None):
        super().__init__()
        n_mid = 3 * RESNET20_BLOCKS
        widths = _check_widths(widths, 3 + n_mid + 1, 'resnet20')
        if widths is None:
            widths = list(RESNET20_STAGE_WIDTHS) + [w for w in RESNET20_STAGE_WIDTHS for _ in range(RESNET20_BLOCKS)]
            widths.append(num_classes)
        streams, mids, out = widths[:3], widths[3:3 + n_mid], widths[-1]
        self.conv1 = nn.Conv2d(3, streams[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(streams[0])
        self.relu = nn.ReLU(inplace=True)
        c_in = streams[0]
        for s in range(3):
            blocks = []
            for b in range(RESNET20_BLOCKS):
                stride = 2 if (s > 0 and b == 0) else 1
                # chenyaofo's rule (projection shortcut where stride or width changes) puts one exactly on the
                # first block of stages 2 and 3; kept structural so pruned widths never change the topology
                down = s > 0 and b == 0
                blocks.append(BasicBlock(c_in, mids[s * RESNET20_BLOCKS + b], streams[s], stride, down))
                c_in = streams[s]
            setattr(self, f'layer{s + 1}', nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c_in, out)
        if head_classes is not None:
            self.module_head = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(out, int(head_classes)))
        _convert(self)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stream_convs(self):
        """Per stage, the convolutions that write its residual stream: the stem (stage 1) or the projection
        shortcut (stages 2, 3), then every block's conv2. Their outputs are summed into one stream tensor."""
        stages = [self.layer1, self.layer2, self.layer3]
        return [[self.conv1 if s == 0 else stage[0].downsample[0]] + [blk.conv2 for blk in stage]
                for s, stage in enumerate(stages)]

    def tie_stream_masks(self):
        """Channel gates only: make each stage's stream-writing convolutions share one gate per channel (one
        Parameter object). A gated-off channel is then 0 in every stream tensor of the stage (0 + 0 through
        the residual sums), so extraction can remove it from the whole stage; with independent gates a
        stream channel survives as long as any one block keeps it. Returns the model."""
        for convs in self.stream_convs():
            gran = {c.mask_granularity for c in convs}
            if len(gran) != 1 or convs[0].gate_scores() is None:
                raise ValueError("tie_stream_masks: enable 'channel' or 'weight+channel' masks on every convolution "
                                 "first (enable_model_masks(model, granularity))")
            name = 'weight_mask' if gran == {'channel'} else 'channel_mask'
            for c in convs[1:]:
                setattr(c, name, getattr(convs[0], name))
        return self

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.fc(torch.flatten(self.avgpool(x), 1))
        if hasattr(self, 'module_head'):
            x = self.module_head(x)
        return x


def vgg16_bn(num_classes=10, head_classes=None, widths=None):
    return VGG(num_classes=num_classes, head_classes=head_classes, widths=widths)


def resnet20(num_classes=10, head_classes=None, widths=None):
    return CifarResNet(num_classes=num_classes, head_classes=head_classes, widths=widths)


# name -> constructor(**kwargs); the pruned variants are the same constructors with ``widths`` (and the module head
# with ``head_classes``), so ``models.build_model({'family': 'cifar', 'name': ..., 'kwargs': ...})`` rebuilds them.
MODELS = {
    'vgg16_bn': vgg16_bn,
    'resnet20': resnet20,
}
