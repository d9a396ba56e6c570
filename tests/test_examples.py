"""The pass-API example runs as a user would run it, and shows what it says it shows."""

import importlib.util
import pathlib

import ksbackend
import passes


def load_example(name):
    path = pathlib.Path(__file__).parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_own_passes_example_reports_each_pass_per_site(capsys):
    ids = load_example("own_passes").main(new_tokens=3)
    assert ids.shape == (2, 13)
    assert "count_rsqrt" not in [p.name for p in passes.DEFAULT_PASSES]  # unregistered again
    graphs = ksbackend.explain().graphs
    model_graphs = [g for g in graphs if g.matched("rms_norm")]
    sampler_graphs = [g for g in graphs if g.matched("sampling")]
    assert model_graphs and sampler_graphs
    for graph in model_graphs:  # the counting pass saw every norm just before rms_norm fused them
        assert len(graph.pass_result("count_rsqrt").left) == graph.matched("rms_norm")
    for graph in sampler_graphs:  # a sampler's softmax is not reported as an unknown attention variant
        assert graph.ops == {"kernelstack::sample": 1} and not graph.pass_result("attention").left
    assert "exponential-noise argmax over softmax, top-k 20, temperature 0.8 absorbed" in capsys.readouterr().out
