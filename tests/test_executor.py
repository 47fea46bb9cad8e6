"""executor="ray": the same results as one process; graphs survive the trip between processes."""
from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from trained_models import deterministic_torch, train_digits  # noqa: E402

import qcompiler  # noqa: E402
from qcompiler.errors import QCompileError  # noqa: E402
from qcompiler.executor import dumps, loads, map_tasks  # noqa: E402
from qcompiler.targets.spec import load_target  # noqa: E402

SPEC = str(Path(__file__).parent.parent / "benchmarks" / "npu-w248.toml")  # 2-, 4-, 8-bit weights, default 8


@pytest.fixture(scope="module")
def digits():
    return train_digits()


@pytest.fixture(scope="module")
def ray_instance():
    import ray  # the test extra installs it
    # The workers import the digits model's class from here, as a cluster's workers import a
    # user's model package.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield ray
    ray.shutdown()


def test_graphs_travel_with_their_node_names_and_meta():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    compiled = qcompiler.qcompile(model, x, target="npu-int8", calib_data=[x], progress=False)
    # torch.fx's own pickling traces the code again: fused graphs come back with other node names.
    fused = compiled.graph("fuse")
    plain = pickle.loads(pickle.dumps(fused))
    assert [n.name for n in plain.graph.nodes] != [n.name for n in fused.graph.nodes]
    for stage in ("capture", "fuse", "insert_observers", "convert"):
        gm = compiled.graph(stage)
        back = loads(dumps(gm))
        assert [(n.name, n.op, str(n.target), n.meta) for n in back.graph.nodes] == \
               [(n.name, n.op, str(n.target), n.meta) for n in gm.graph.nodes], stage
        assert back.code == gm.code and back.meta == gm.meta
    back = loads(dumps(compiled))
    assert torch.equal(back(x), compiled(x))
    assert back.report().to_markdown() == compiled.report().to_markdown()


def test_specs_travel_as_data_and_come_back_equal():
    spec = load_target("npu-int4")
    back = pickle.loads(pickle.dumps(spec))
    assert back == spec and back.text == spec.text
    for metric, formula in spec.cost.items():
        want = {name: 3.0 + i for i, name in enumerate(formula.variables)}
        assert back.cost[metric].evaluate(**want) == formula.evaluate(**want)


def test_unknown_executor_and_job_keywords_are_refused(digits):
    with pytest.raises(QCompileError, match="executor='dask'.*local, ray"):
        map_tasks(len, None, [1], executor="dask")
    with pytest.raises(QCompileError, match="executor='dask'"):
        qcompiler.qcompile(digits.model, digits.calib[:1], calib_data=[digits.calib[:8]], executor="dask", progress=False)
    with pytest.raises(QCompileError, match="job 1: 'budjet' is not a qcompile keyword"):
        qcompiler.compile_many(digits.model, digits.calib[:1], [{"target": "npu-int8"}, {"budjet": 0.5}])


def _budgeted(digits, executor):
    with deterministic_torch():
        return qcompiler.qcompile(digits.model, digits.calib[:1], target=SPEC, calib_data=list(digits.calib.split(64)),
                                  budget={"weight_memory": 0.55}, progress=False, executor=executor)


def test_sensitivity_on_ray_is_the_one_process_table(digits, ray_instance):
    local, remote = _budgeted(digits, "local"), _budgeted(digits, "ray")
    assert len(local._run.ctx.sensitivity.values) > 2
    assert remote._run.ctx.sensitivity.values == local._run.ctx.sensitivity.values
    assert [g.format_name for g in remote.plan.groups] == [g.format_name for g in local.plan.groups]
    assert torch.equal(remote(digits.heldout), local(digits.heldout))


def test_pareto_on_ray_gives_the_same_points(digits, ray_instance):
    def curve(executor):
        with deterministic_torch():
            return qcompiler.pareto(digits.model, digits.calib[:1], target=SPEC, calib_data=list(digits.calib.split(64)),
                                    budgets=[1.0, 0.6, 0.4, 0.01], eval_data=[digits.heldout], progress=False,
                                    executor=executor)

    local, remote = curve("local"), curve("ray")
    assert [p.status for p in local.points][-1] == "INFEASIBLE"
    for a, b in zip(local.points, remote.points):
        assert a.status == b.status and a.choice == b.choice
        for field in ("weight_memory_bytes", "bops", "predicted", "sqnr_db", "top1_agreement"):
            x, y = getattr(a, field), getattr(b, field)
            assert (math.isnan(x) and math.isnan(y)) or x == y, field


def test_compile_many_on_ray_matches_qcompile_one_by_one(digits, ray_instance):
    jobs = [{"target": "npu-int8"}, {"target": SPEC, "budget": {"weight_memory": 0.5}}, {"target": "npu-int4"}]
    calib = list(digits.calib.split(64))
    with deterministic_torch():
        remote = qcompiler.compile_many(digits.model, digits.calib[:1], jobs, calib_data=calib, executor="ray",
                                        progress=False)
        local = [qcompiler.qcompile(digits.model, digits.calib[:1], calib_data=calib, progress=False, **job)
                 for job in jobs]
    assert [m.target.name for m in remote] == [m.target.name for m in local]
    outputs = [m(digits.heldout) for m in remote]
    for r, l, out in zip(remote, local, outputs):
        assert torch.equal(out, l(digits.heldout))
        assert r.weight_memory_bytes == l.weight_memory_bytes
    assert not torch.equal(outputs[0], outputs[2])
