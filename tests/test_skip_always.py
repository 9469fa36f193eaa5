"""--skip always (ResiliNet+ / deepFogGuard): every inner cut adds the skip from the cut before it, weighted
with ResiliNet's hyperconnection weights; a dead block's output is rebuilt as in failover, scaled."""
import itertools
import json

import numpy as np
import pytest
import torch

from robustpart.cli.main import main
from robustpart.cuts import named_cuts
from robustpart.routes import blend_weights, holder, needed_pairs, skip_scale
from robustpart.simulate import FailureSimulator

from test_pipeline import compiled, image_folder, images, pipeline_plan, shape_args, traced
from tiny_models import ChainNet, ResNetLike


@pytest.fixture
def chain_file(tmp_path):
    model, _ = traced(ChainNet)
    torch.save(model, tmp_path / "chain.pt")
    return tmp_path / "chain.pt"


def close(weights: dict, expected: dict) -> bool:
    return weights.keys() == expected.keys() and all(w == pytest.approx(expected[t]) for t, w in weights.items())


def always_plan(weights, board_failure=0.1, cuts=("a", "b", "c"), group=1):
    _, graph = traced(ChainNet)
    return pipeline_plan(graph, named_cuts(graph, list(cuts)), group=group, method="robust" if group > 1 else "lop",
                         skip="always", hyperconnections={"weights": weights, "board_failure": board_failure})


def test_resilinet_weights_for_every_scheme():
    """4 blocks of one board, p = 0.1: a block lives with 0.9, the input always. Cut t sums block t-1's output
    and the skip from cut t-1 (from block t-2); a skip whose source block is dead is not added."""
    relative, reliability, one = (always_plan(w) for w in ("relative", "reliability", "one"))
    healthy = blend_weights(relative, ())
    assert healthy[1] == pytest.approx((0.9 / 1.9, 1 / 1.9))          # from block 0 and from the input
    assert healthy[2] == pytest.approx((0.5, 0.5)) and healthy[3] == pytest.approx((0.5, 0.5))
    assert close(blend_weights(relative, (0,)), {3: (0.5, 0.5)})    # cut 1 rebuilt; cut 2: block 1 alone
    assert close(blend_weights(reliability, ()), {1: (0.9, 1.0), 2: (0.9, 0.9), 3: (0.9, 0.9)})
    assert close(blend_weights(reliability, (0,)), {2: (0.9, 0.0), 3: (0.9, 0.9)})
    assert blend_weights(one, ()) == {1: (1.0, 1.0), 2: (1.0, 1.0), 3: (1.0, 1.0)}
    assert blend_weights(one, (1,)) == {1: (1.0, 1.0)}                 # cut 3's skip source, block 1, is dead
    # a rebuilt cut (its producer dead) is the one live connection: scaled by its source's weight
    assert [skip_scale(reliability, j) for j in (0, 1, 2)] == pytest.approx([1.0, 0.9, 0.9])
    assert [skip_scale(relative, j) for j in (0, 2)] == [1.0, 1.0] and skip_scale(one, 2) == 1.0
    hybrid = always_plan("reliability", cuts=("b",), group=2)          # a group of 2 lives with 1 - 0.1^2
    assert close(blend_weights(hybrid, ()), {1: (0.99, 1.0)})


def test_failover_plans_have_no_always_on_skips():
    _, graph = traced(ChainNet)
    plan = pipeline_plan(graph, named_cuts(graph, ["a", "b", "c"]))
    assert plan.skip == "failover" and blend_weights(plan, ()) == {} and skip_scale(plan, 2) == 1.0


def test_the_one_block_skip_is_held_by_its_producer_and_its_consumer():
    plan = always_plan("relative")
    assert set(needed_pairs(plan)) >= {(0, 1), (1, 2), (2, 3), (0, 2)}
    assert holder(plan, (1, 2)) == (1, 2) and holder(plan, (0, 1)) == (0, 1)
    assert holder(plan, (0, 2)) == (2,)                    # a longer skip: only when block 1 is dead, at block 2


@pytest.mark.parametrize("cls, cuts, group, weights", [
    (ChainNet, ["a", "b", "c"], 1, "relative"),
    (ResNetLike, ["stem", "conv2", "conv3"], 1, "reliability"),   # cut stages, compensation
    (ChainNet, ["b"], 2, "one"),                                   # hybrid 2x2
])
def test_sharded_execution_equals_the_simulator_with_always_on_skips(tmp_path, cls, cuts, group, weights):
    from robustpart.runtime import LocalExecutor
    model, graph, plan, bundle, adapters, compensation = compiled(
        tmp_path, cls, cuts, group, "robust" if group > 1 else "lop", compensate=cls is ResNetLike,
        skip="always", hyperconnections={"weights": weights, "board_failure": 0.1})
    assert bundle.manifest.pipeline.hyperconnections == {"weights": weights, "board_failure": 0.1}
    executor = LocalExecutor(bundle.path)
    sim = FailureSimulator(graph, plan, compensation.data if compensation else None, adapters=adapters)
    x = images(16, seed=5)
    with torch.no_grad():
        original = model(x).numpy()
    healthy = executor.run(x.numpy())
    # the skips are in the no-failure answer: it is not the original model's
    assert np.abs(healthy - original).max() > 1e-3 * np.abs(original).max()
    np.testing.assert_allclose(healthy, sim.logits(x, ()).numpy(), rtol=1e-4, atol=1e-4)
    for k in range(1, plan.n_boards):
        for failed in itertools.combinations(range(plan.n_boards), k):
            np.testing.assert_allclose(executor.run(x.numpy(), failed), sim.logits(x, failed).numpy(),
                                       rtol=1e-4, atol=1e-4, err_msg=f"failed {failed}")


def test_compile_always_records_the_weights_and_bad_options_are_one_clear_line(capsys, tmp_path, chain_file):
    folder = image_folder(tmp_path / "images")
    common = [str(chain_file), *shape_args(), "--mode", "pipeline", "--cuts", "a,b,c", "--calib-data", str(folder),
              "--no-shards"]
    code = main(["compile", *common, "--skip", "always", "--skip-weights", "one", "--board-failure", "0.2",
                 "--out", str(tmp_path / "b")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "the no-failure output is not the original model's" in captured.err
    plan = json.loads((tmp_path / "b" / "plan.json").read_text())
    assert (plan["skip"], plan["hyperconnections"]) == ("always", {"weights": "one", "board_failure": 0.2})
    for extra, message in [(["--skip-weights", "one"], "--skip-weights would not be used"),
                           (["--skip", "always", "--board-failure", "1.5"], "--board-failure 1.5 is not a probability")]:
        code = main(["compile", *common, *extra, "--out", str(tmp_path / "c")])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
        assert not (tmp_path / "c").exists()


def test_finetune_trains_always_on_skips_with_no_block_dropped(capsys, tmp_path, chain_file):
    """With failout 0 nothing is dropped: a failover bundle has nothing to train, an always bundle trains its
    skips on every batch (they are in every forward pass)."""
    from robustpart.bundle import Bundle
    folder = image_folder(tmp_path / "images")
    for skip in ("failover", "always"):
        out = tmp_path / skip
        assert main(["-q", "compile", str(chain_file), *shape_args(), "--mode", "pipeline", "--cuts", "a,b,c",
                     "--calib-data", str(folder), "--no-shards", "--skip", skip, "--out", str(out)]) == 0
        capsys.readouterr()
        assert main(["-q", "finetune", str(out), "--data", str(folder), "--failout", "0", "--batch-size", "8"]) == 0
        old, new = Bundle.load(out).load_adapters(), Bundle.load(tmp_path / f"{skip}-failout").load_adapters()
        changed = {p for p in old.weights if not np.allclose(old.weights[p], new.weights[p])}
        assert changed == (set() if skip == "failover" else {(0, 1), (1, 2), (2, 3)}), (skip, changed)
