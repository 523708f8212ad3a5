"""FLOPs and throughput: torch.utils.flop_counter numbers that match the paper's accounting."""
import timm

from chase_timm.metrics import count_flops, sparse_flops, throughput


def test_dense_resnet50_flops_match_the_paper():
    model = timm.create_model("resnet50")
    assert abs(count_flops(model) - 8.2e9) < 0.05e9  # the paper's dense ResNet-50: 8.2e9 FLOPs at 224 px


def test_sparse_flops_skip_zero_weights_and_throughput_runs():
    model = timm.create_model("resnet18", num_classes=10)
    size = (3, 32, 32)
    dense = count_flops(model, size)
    assert sparse_flops(model, {}, size) == dense
    half = sparse_flops(model, {"layer1.0.conv1.weight": 0.5}, size)
    conv = 2 * 64 * 64 * 9 * 8 * 8  # 2 x MACs of layer1.0.conv1 at 8x8 output
    assert dense - half == conv // 2
    assert throughput(model, batch_size=2, input_size=size, warmup=1, iters=2) > 0
