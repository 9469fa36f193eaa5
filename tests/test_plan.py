import json

import numpy as np
import pytest

from robustpart.errors import ConfigError, PlanError
from robustpart.partition import cluster, make_plan, round_robin
from robustpart.plan import Plan, UnitPlacement
from robustpart.scores import Scores

from plan_helpers import UNITS, random_scores

SPLIT_UNITS = {"a": 7, "b": 16, "d": 64}   # an even split over 4 boards needs >= 4 channels per unit


def test_cluster_is_complete_linkage_with_strict_threshold():
    points = np.array([[0.0], [0.1], [0.2], [1.0]])
    # 0-0.1-0.2 is a chain; complete linkage merges them only when the *largest* distance (0.2) < t
    assert len(set(cluster(points, 0.15))) == 3          # {0,0.1} or {0.1,0.2} pair up, the rest alone
    labels = cluster(points, 0.2 + 1e-9)
    assert labels[0] == labels[1] == labels[2] != labels[3]
    assert len(set(cluster(points, 0.2))) == 3            # d_max < t is strict, as in Algorithm 1 line 18
    assert len(set(cluster(points, 0.0))) == 4
    assert len(set(cluster(points, 10.0))) == 1


def test_round_robin_pads_groups_and_keeps_replicas_apart():
    groups = [np.array([5, 1, 2]), np.array([0]), np.array([3, 4, 6, 7, 8])]
    boards = round_robin(groups, 4)
    placement = UnitPlacement(9, boards)
    # every group padded to a multiple of 4: 3->4, 1->4, 5->8 => 16 copies, 4 per board
    assert [b.size for b in boards] == [4, 4, 4, 4]
    assert placement.copies().sum() == 16
    assert placement.copies()[0] == 4                      # a group of one is on every board
    for held in boards:
        assert np.unique(held).size == held.size


@pytest.mark.parametrize("n_boards", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.3, 1.0, 100.0])
def test_robust_plan_properties_on_random_scores(n_boards, threshold):
    scores = random_scores()
    plan = make_plan(UNITS, n_boards, "robust", scores, threshold)
    plan.validate(UNITS)
    for p in plan.units.values():
        counts = [b.size for b in p.board_channels]
        for gid in np.unique(p.groups):
            members = set(np.flatnonzero(p.groups == gid).tolist())
            per_board = [len(members & set(b.tolist())) for b in p.board_channels]
            assert len(set(per_board)) == 1, "every board gets the same number of channels of a group"
        assert len(set(counts)) == 1
        copies = p.copies()
        if threshold == 0.0:
            assert (copies == n_boards).all(), "t=0 is full replication"
        if threshold == 100.0:
            # one group: padded to the next multiple of N, at most N-1 replicas
            assert copies.sum() - p.channels == (-p.channels) % n_boards


def test_robust_plan_on_real_scores_of_a_trained_model():
    from robustpart.criteria import compute_scores
    from robustpart.models import load_graph
    graph, _ = load_graph("fmnist_vgg16_bn")
    scores = compute_scores(graph, ("l1",))
    channels = {u.name: u.channels for u in graph.units}
    previous = None
    for t in (0.0, 0.05, 0.1, 0.3, 10.0):
        plan = make_plan(channels, 4, "robust", scores, t)
        plan.validate(channels)
        factor = plan.replication_factor()
        if previous is not None:
            assert factor <= previous + 1e-12, "a larger threshold never replicates more"
        previous = factor
    assert make_plan(channels, 4, "robust", scores, 0.0).replication_factor() == 4.0
    assert make_plan(channels, 4, "robust", scores, 10.0).replication_factor() < 1.02


def test_lop_is_contiguous_and_even():
    plan = make_plan(SPLIT_UNITS, 4, "lop")
    b = plan.units["b"].board_channels
    assert [x.tolist() for x in b] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert plan.replication_factor() == 1.0


def test_full_puts_every_channel_on_every_board():
    plan = make_plan(UNITS, 3, "full")
    assert all((p.copies() == 3).all() for p in plan.units.values())


def test_random_is_an_even_split_that_depends_on_the_seed():
    a, b, c = (make_plan(SPLIT_UNITS, 4, "random", seed=s) for s in (1, 1, 2))
    assert a.to_json() == b.to_json()
    assert a.to_json() != c.to_json()
    assert a.replication_factor() == 1.0
    assert sorted(len(x) for x in a.units["d"].board_channels) == [16, 16, 16, 16]


def test_replicate_option_keeps_a_unit_whole():
    plan = make_plan(SPLIT_UNITS, 4, "lop", replicate=["d"])
    assert (plan.units["d"].copies() == 4).all()
    assert (plan.units["b"].copies() == 1).all()


def test_per_unit_thresholds(tmp_path):
    from robustpart.partition import load_thresholds
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"default": 100.0, "d": 0.0}))
    default, per_unit = load_thresholds(path)
    plan = make_plan(UNITS, 4, "robust", random_scores(), default, per_unit)
    assert (plan.units["d"].copies() == 4).all()
    assert plan.units["b"].copies().sum() == 16
    with pytest.raises(PlanError, match="does not have"):
        make_plan(UNITS, 4, "robust", random_scores(), 0.3, {"zz*": 0.1})


def test_json_round_trip(tmp_path):
    plan = make_plan(UNITS, 4, "robust", random_scores(), 0.3, model={"name": "x"})
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.to_json() == plan.to_json()
    assert again.options["threshold"] == 0.3 and again.options["criteria"] == ["s0", "s1", "s2"]
    for name in UNITS:
        assert all(np.array_equal(x, y) for x, y in zip(plan.units[name].board_channels, again.units[name].board_channels))


def test_validate_refuses_bad_plans():
    def plan_with(boards, channels=4):
        return Plan(n_boards=len(boards), method="x", units={"u": UnitPlacement(channels, [np.array(b) for b in boards])})

    plan_with([[0, 1], [2, 3]]).validate()
    with pytest.raises(PlanError, match="on no board"):
        plan_with([[0, 1], [2]]).validate()
    with pytest.raises(PlanError, match="twice"):
        plan_with([[0, 1, 1], [2, 3]]).validate()
    with pytest.raises(PlanError, match="outside"):
        plan_with([[0, 1], [2, 3, 4]]).validate()
    with pytest.raises(PlanError, match="channels in the model"):
        plan_with([[0, 1], [2, 3]]).validate({"u": 5})
    with pytest.raises(PlanError, match="schema"):
        Plan.from_json({"schema": 99})


def test_make_plan_refuses_bad_requests():
    with pytest.raises(PlanError, match=">= 1"):
        make_plan(UNITS, 0, "lop")
    with pytest.raises(PlanError, match="exceeds the 3 output channels of unit 'c'"):
        make_plan(UNITS, 4, "lop")
    make_plan(UNITS, 4, "robust", random_scores(), 0.3).validate(UNITS)   # replication covers 3 < 4
    with pytest.raises(PlanError, match=">= 0"):
        make_plan(UNITS, 2, "robust", random_scores(), -0.1)
    with pytest.raises(ConfigError, match="unknown partitioning method"):
        make_plan(UNITS, 2, "nope")
    with pytest.raises(PlanError, match="needs importance scores"):
        make_plan(UNITS, 2, "robust", None, 0.3)


def test_scores_normalisation_and_selection():
    s = Scores(("l1", "taylor"), {"u": np.array([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0]])})
    assert np.allclose(s.normalized("u"), [[0.0, 0.0], [1.0, 0.0], [0.5, 0.0]])
    assert s.select(("taylor",)).tables["u"].shape == (3, 1)
    with pytest.raises(PlanError, match="not computed"):
        s.select(("jsd",))


def test_cdc_splits_over_n_minus_1_boards_and_the_parity_rebuilds_any_one_dead_board():
    plan = make_plan({"a": 7, "b": 6}, 4, "cdc")
    a = plan.units["a"]
    assert [h.tolist() for h in a.board_channels] == [[0, 1, 2], [3, 4], [5, 6], []] and a.parity == 3
    assert plan.surviving("a", ()).all() and plan.surviving("a", (1,)).all() and plan.surviving("a", (3,)).all()
    assert np.flatnonzero(~plan.surviving("a", (1, 2))).tolist() == [3, 4, 5, 6]    # two dead: both lost
    assert np.flatnonzero(~plan.surviving("a", (0, 3))).tolist() == [0, 1, 2]       # parity dead too
    assert a.share(3) == a.share(0) == 3 / 7 and a.share(1) == 2 / 7
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.units["a"].parity == 3 and again.lost_signature((1, 2)) == plan.lost_signature((1, 2))


def test_align_rounds_each_boards_channels_up_with_the_most_important_replicas():
    from robustpart.partition import align_placement
    importance = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 0.5, 0.05])
    held = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5, 6, 7, 8, 9])]
    aligned = align_placement(held, importance, 4)
    assert [len(h) for h in aligned] == [4, 4, 8]
    assert list(aligned[0]) == [0, 1, 2, 4]            # 4: the most important channel board 0 lacks
    assert list(aligned[1]) == [0, 2, 3, 4]            # 0 and 2 are added
    assert set(aligned[2]) >= set(held[2]) and len(set(aligned[2])) == 8
    assert [len(h) for h in align_placement([np.arange(9)], importance, 4)] == [10]    # at most all channels


def test_an_aligned_robust_plan_keeps_every_channel_and_adds_only_replicas():
    scores = random_scores()
    plain = make_plan(UNITS, 4, "robust", scores, 0.3)
    aligned = make_plan(UNITS, 4, "robust", scores, 0.3, align=8)
    aligned.validate(UNITS)
    assert aligned.options["align"] == 8 and "align" not in plain.options
    for name, p in aligned.units.items():
        for before, after in zip(plain.units[name].board_channels, p.board_channels):
            assert set(before) <= set(after) and np.unique(after).size == after.size
            assert after.size % 8 == 0 or after.size == UNITS[name]
    assert aligned.replication_factor() > plain.replication_factor()
    with pytest.raises(PlanError, match="--align must be an integer >= 1"):
        make_plan(UNITS, 4, "robust", scores, 0.3, align=0)
