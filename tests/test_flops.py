"""models/flops.py against counts computed by hand from the layer shapes (never from the counter itself)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers.mask import MaskConv, MaskLinear
from layers.monarch import MonarchLinear
from models.flops import count_flops, count_params


def test_dense_mlp_closed_form():
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    r = count_flops(mlp, torch.randn(5, 16))
    # 5 rows: 2*in*out multiply-adds + one add per output for each bias
    assert r['total'] == 5 * (2 * 16 * 32 + 32) + 5 * (2 * 32 * 8 + 8)
    assert r['by_module'] == {'0': 5 * (2 * 16 * 32 + 32), '2': 5 * (2 * 32 * 8 + 8)}
    assert r['other'] == 0 and r['per_image'] == r['total'] / 5
    assert count_params(mlp) == 16 * 32 + 32 + 32 * 8 + 8


def test_monarch_mlp_closed_form():
    mlp = nn.Sequential(MonarchLinear(16, 32, nblocks=4, impl='ref'), nn.GELU(),
                        MonarchLinear(32, 16, nblocks=4, impl='ref'))
    # fly's shapes: 16 -> 32 is blkdiag1 (4, 4, 4) = 64 and blkdiag2 (4, 8, 4) = 128; 32 -> 16 is (4,4,8), (4,4,4)
    assert [tuple(p.shape) for n, p in mlp.named_parameters() if 'blkdiag' in n] == \
        [(4, 4, 4), (4, 8, 4), (4, 4, 8), (4, 4, 4)]
    x = torch.randn(2, 3, 16)  # 6 tokens
    r = count_flops(mlp, x)
    per_token = (2 * (64 + 128) + 32) + (2 * (128 + 64) + 16)
    assert r['total'] == 6 * per_token  # the internal bmm's of the reference path are not counted twice
    assert r['other'] == 0
    assert count_params(mlp) == 64 + 128 + 32 + 128 + 64 + 16
    # the dense equivalent costs more: 2*16*32 + 32 + 2*32*16 + 16 per token
    assert r['total'] < 6 * (2 * 16 * 32 + 32 + 2 * 32 * 16 + 16)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gconv = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(F.relu(self.gconv(x)).flatten(1))


def test_conv_net_hand_checked():
    r = count_flops(ConvNet(), torch.randn(2, 3, 8, 8))
    # conv: out (2, 4, 4, 4) -> 32 positions; weight 4*3*3*3 = 108; bias adds 2*4*16 = 128
    conv = 2 * 108 * 32 + 128
    bn = 2 * (2 * 4 * 16)  # eval BatchNorm: scale + shift per element
    gconv = 2 * (4 * 2 * 9) * 32  # groups=2: each output channel sees 2 input channels
    fc = 2 * (2 * 64 * 3) + 2 * 3
    assert r['by_module'] == {'conv': conv, 'bn': bn, 'gconv': gconv, 'fc': fc}
    assert r['total'] == conv + bn + gconv + fc == 12678
    assert r['per_image'] == 12678 / 2


def test_masked_layers_count_nonzero_weights():
    lin = MaskLinear(4, 3).enable_masks()
    wm = torch.full((3, 4), -1.0)
    wm[0, :3] = 1.0
    wm[2, 1:3] = 0.5  # 5 kept weights
    with torch.no_grad():
        lin.weight_mask.copy_(wm)
        lin.bias_mask.copy_(torch.tensor([1.0, -1.0, 1.0]))  # 2 kept bias entries
        lin.weight.fill_(0.3)
        lin.bias.fill_(0.1)
    assert count_flops(lin, torch.randn(2, 4))['total'] == 2 * (2 * 5) + 2 * 2
    assert count_params(lin) == 5 + 2  # mask scores are not weights

    conv = MaskConv(2, 3, 3, padding=1, bias=False).enable_masks()
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.weight_mask.fill_(-1.0)
        conv.weight_mask[1, 0].fill_(1.0)  # 9 kept weights of output channel 1
    r = count_flops(conv, torch.randn(1, 2, 5, 5))
    assert r['total'] == 2 * 9 * 25

    # nonzero_only on a plain layer: zero weights are not counted
    plain = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        plain.weight.copy_(torch.tensor([[1.0, 0, 0, 2.0], [0, 0, 0, 0]]))
    assert count_flops(plain, torch.randn(3, 4), nonzero_only=True)['total'] == 3 * 2 * 2
    assert count_flops(plain, torch.randn(3, 4))['total'] == 3 * 2 * 8
    assert count_params(plain, nonzero_only=True) == 2


class ToyAttention(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.fused = fused
        self.norm = nn.LayerNorm(8)

    def forward(self, x):  # x (B, T, 8), 2 heads of 4
        b, t, c = x.shape
        q = self.norm(x).reshape(b, t, 2, 4).transpose(1, 2)
        if self.fused:
            return F.scaled_dot_product_attention(q, q, q)
        return torch.softmax(q @ q.transpose(-1, -2) / 2.0, -1) @ q


def test_attention_products_and_layernorm():
    b, t = 3, 5
    # q k^T: 2*B*H*T*T*hd ; attn v: the same; LayerNorm with affine: 8 per element
    expected = 2 * (2 * b * 2 * t * t * 4) + 8 * b * t * 8
    for fused in (False, True):
        r = count_flops(ToyAttention(fused), torch.randn(b, t, 8))
        assert r['total'] == expected, (fused, r)
