"""benchmarks/bench_semi_structured.py on a machine without a suitable GPU: it says so and writes
nothing; its model really is 2:4 where the export can use it; its table shows refused rows."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_semi_structured as bench
from plugins.export.semi_structured import pattern_violations


@pytest.mark.skipif(bench.gpu_problem() is None, reason="this machine has a suitable GPU")
def test_without_a_gpu_it_exits_2_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--quick", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_end_to_end_model_is_2_4_along_the_inputs_of_every_conv1d():
    pytest.importorskip("transformers")
    net, tokens = bench.patterned_gpt2(steps=1)
    conv1d = [m for m in net.modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 16 and tokens.shape == (8, 64)
    for m in conv1d:
        matrix = m.weight.detach().t()  # (out, in), what the export converts
        assert pattern_violations(matrix) == 0 and float((matrix == 0).float().mean()) == 0.5
    assert pattern_violations(net.lm_head.weight.detach()) > 0  # tied to the embedding: left dense


def test_the_table_shows_measured_rows_and_says_why_a_row_did_not_run():
    meta = {"command": "python benchmarks/bench_semi_structured.py", "device": "GPU", "torch": torch.__version__,
            "rounds": 15, "reps": 20}
    measured = {"shape": [2048, 512], "tokens": 512, "dtype": "float16", "pattern": "2:4", "backend": "cusparselt",
                "dense_ms": 0.02,
                "sparse_ms": 0.016, "speedup": 1.25, "lo": 1.2, "hi": 1.3, "max_rel_difference": 1e-3}
    refused = {"shape": [1536, 512], "tokens": 512, "dtype": "float32", "pattern": "1:2", "skipped": "RuntimeError: x"}
    text = bench.markdown({"meta": meta, "layers": [measured, refused]})
    assert "| (2048, 512) | 512 | float16 | 2:4 | cusparselt | 0.0200 | 0.0160 | 1.25x (1.20-1.30) | 1.0e-03 |" in text
    assert "| (1536, 512) | 512 | float32 | 1:2 | - | - | - | not run: RuntimeError: x | - |" in text
