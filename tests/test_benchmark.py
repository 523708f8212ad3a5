"""recipes/benchmark.py on a tiny model: the table, the JSON, and speedup/efficiency consistent with FLOPs."""
import json

import pytest
import timm

import benchmark
import chase_timm
from chase_timm.metrics import count_flops


def test_benchmark_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    report = benchmark.main(["--model", "resnet18", "--img-size", "32", "--batch-sizes", "1", "2", "--layouts", "nchw",
                             "channels_last", "--repeats", "2", "--warmup", "1", "--block-seconds", "0.01",
                             "--threads", "1", "--fold-bn", "--chase", "S_c=0.5",
                             "--chase", "S_c=0.5,channel_round_to=8", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    out = capsys.readouterr().out
    table = out[out.index("img/s"):]
    assert "speedup" in table and "FLOPs lim" in table and "effic." in table
    assert table.count("chase:S_c=0.5,channel_round_to=8") == 4  # one row per batch size and layout
    models = report["models"]
    dense, slim, rounded = models["dense:resnet18"], models["chase:S_c=0.5"], models["chase:S_c=0.5,channel_round_to=8"]
    assert slim["params"] < dense["params"] and slim["dense_flops"] < dense["dense_flops"]
    assert slim["sparse_flops"] < slim["dense_flops"] == pytest.approx(rounded["dense_flops"], rel=0.05)
    assert report["settings"]["input_size"] == [3, 32, 32] and report["settings"]["fold_bn"]
    assert len(report["results"]) == 3 * 2 * 2  # models x batch sizes x layouts
    by_setting = {}
    for row in report["results"]:
        by_setting.setdefault((row["batch_size"], row["layout"]), {})[row["model"]] = row
        assert row["img_per_s"] == pytest.approx(row["batch_size"] / (row["latency_ms"] / 1e3))
        assert row["flops_limit"] == pytest.approx(dense["dense_flops"] / models[row["model"]]["dense_flops"])
        assert row["efficiency"] == pytest.approx(row["speedup"] / row["flops_limit"])
    for rows in by_setting.values():
        assert rows["dense:resnet18"]["speedup"] == 1.0
        for row in rows.values():
            assert row["speedup"] == pytest.approx(rows["dense:resnet18"]["latency_ms"] / row["latency_ms"])


def test_bad_chase_spec_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="not KEY=VALUE with a ChaseConfig field"):
        benchmark.main(["--model", "resnet18", "--chase", "sparsity=0.5", "--json", str(tmp_path / "b.json")])
    with pytest.raises(SystemExit, match="channel_sparsity"):
        benchmark.main(["--model", "resnet18", "--chase", "S_c=1.5", "--json", str(tmp_path / "b.json")])
    with pytest.raises(SystemExit, match="no such folder"):
        benchmark.main(["--slim", str(tmp_path / "missing"), "--json", str(tmp_path / "b.json")])


def test_benchmark_a_saved_slim_model_at_its_own_input_size(tmp_path):
    slim = benchmark.build_slim("resnet18", 10, {"channel_sparsity": 0.5}, size=32, steps=4, seed=0)
    data_config = {**timm.data.resolve_model_data_config(slim), "input_size": (3, 32, 32)}
    folder = chase_timm.save_pretrained(slim, tmp_path / "slim", data_config=data_config)
    report = benchmark.main(["--model", "resnet18", "--slim", str(folder), "--batch-sizes", "2", "--layouts", "nchw",
                             "--repeats", "1", "--warmup", "1", "--block-seconds", "0.01", "--device", "cpu",
                             "--compile", "eager", "--json", str(tmp_path / "b.json")])
    assert report["settings"]["input_size"] == [3, 32, 32]  # the size the slim model records, not 224
    assert report["settings"]["compile"] == "eager" and len(report["results"]) == 2
    facts = report["models"][str(folder)]
    assert facts["dense_flops"] == count_flops(slim, (3, 32, 32)) < report["models"]["dense:resnet18"]["dense_flops"]


@pytest.mark.parametrize("name", ["test_vit", "test_coatnet"])  # timm fixed_input_size; coatnet fails at 32 px
def test_synthetic_slim_of_a_fixed_size_model_is_built_at_its_own_size(name):
    slim = benchmark.build_slim(name, 10, {"channel_sparsity": 0.5}, size=None, steps=4, seed=0)
    dense = timm.create_model(name, num_classes=10)
    assert count_flops(slim, (3, 160, 160)) < count_flops(dense, (3, 160, 160))  # built at 160 px, not 32
