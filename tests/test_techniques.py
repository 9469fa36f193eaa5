"""Technique selection per failure set (runtime/techniques.py): the policy file, CONTINUER's normalised
weighted sum and its limits, the candidates' metrics from the boards' profiles, and the mesh applying the
choice (a board does not take over where techniques.json says compensate). No torch."""
import json
import shutil
import time

import pytest

from robustpart.errors import ConfigError
from robustpart.runtime import load_manifest
from robustpart.runtime.techniques import (BYPASS, COMPENSATE, TAKEOVER, Candidate, Policy, candidates, choose,
                                           load_techniques, technique_in_use, write_techniques)

from fixture_bundles import ASSETS
from mesh_helpers import TAKEOVER as TAKEOVER_SETTINGS, References, start_mesh

pytestmark = pytest.mark.board


def pair():
    return [Candidate(COMPENSATE, 0.80, 10.0, 0.0, 1_000_000), Candidate(TAKEOVER, 0.93, 18.0, 30.0, 2_000_000)]


def policy(tmp_path, **fields):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(fields))
    return Policy.load(path)


def test_the_weights_and_the_limits_decide(tmp_path):
    assert choose(pair(), policy(tmp_path, weights={"accuracy": 1, "latency": 0, "downtime": 0})).technique == TAKEOVER
    latency_first = policy(tmp_path, weights={"accuracy": 0.2, "latency": 0.8, "downtime": 0})
    options = pair()
    assert choose(options, latency_first).technique == COMPENSATE
    assert [c.score for c in options] == [0.8, 0.2]          # normalised: the best of each metric scores 1
    # a limit overrides the weights: below min_accuracy is out, above max_latency_ms is out
    assert choose(pair(), policy(tmp_path, min_accuracy=0.9, weights={"latency": 1, "accuracy": 0})).technique == TAKEOVER
    assert choose(pair(), policy(tmp_path, max_latency_ms=15, weights={"accuracy": 1})).technique == COMPENSATE
    options = pair()
    chosen = choose(options, policy(tmp_path, min_accuracy=0.95, max_downtime_ms=10))
    assert chosen.technique == TAKEOVER and not any(c.meets for c in options)   # none meets: the most accurate


def test_a_bad_policy_file_says_what_is_wrong(tmp_path):
    for fields, message in [({"min_acc": 0.9}, "unknown key 'min_acc'"), ({"min_accuracy": 90}, "<= 1"),
                            ({"weights": {"accuracy": 0, "latency": 0, "downtime": 0}}, "every weight is 0"),
                            ({"weights": {"speed": 1}}, "keys among")]:
        with pytest.raises(ConfigError, match=message):
            policy(tmp_path, **fields)
    (tmp_path / "policy.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        Policy.load(tmp_path / "policy.json")


def test_candidates_take_latency_from_the_profiles_and_downtime_from_the_load_times(tmp_path):
    manifest = load_manifest(ASSETS / "mesh")
    stages = [s.index for s in manifest.stages]
    profiles = {b: {"stages": [{"stage": s, "ms_p50": 1.0 + b} for s in stages if manifest.stages[s].shards[b].has_work],
                    "takeover_load_ms": {str(d): 10.0 * (b + 1) for d in range(4) if d != b}} for b in range(4)}
    compensate, takeover = candidates(manifest, (2,), 0.7, 0.9, profiles)
    # every stage waits for the slowest live board: board 3 (4 ms per stage), or its stage plus board 2's
    assert compensate.latency_ms == pytest.approx(sum(4.0 for s in stages if manifest.stages[s].shards[3].has_work))
    assert (compensate.accuracy, compensate.downtime_ms, takeover.accuracy) == (0.7, 0.0, 0.9)
    assert takeover.latency_ms > compensate.latency_ms and takeover.downtime_ms in (10.0, 20.0, 40.0)
    assert takeover.memory_bytes > max(manifest.param_bytes(b) for b in (0, 1, 3))
    no_profiles = candidates(manifest, (2,), 0.7, 0.9, {})
    assert all(c.latency_ms is None for c in no_profiles)
    with pytest.raises(ConfigError, match="robustpart profile"):
        choose(no_profiles, policy(tmp_path, max_latency_ms=5))


def test_pipeline_and_hybrid_candidates_are_the_bypass_and_the_takeover_the_mesh_does():
    pipe = load_manifest(ASSETS / "pipeline")                      # a chain: any backup takes a block over
    bypass, takeover = candidates(pipe, (1,), 0.6, 0.9, {})
    assert (bypass.technique, takeover.technique, takeover.accuracy) == (BYPASS, TAKEOVER, 0.9)
    assert technique_in_use(pipe, (0, 2, 3), {2: 0b10}) == "board 1 taken over by 2"
    assert "taken over" not in technique_in_use(pipe, (0, 2, 3), {})
    hybrid = load_manifest(ASSETS / "hybrid")                      # groups {0,1}, {2,3}: only inside a group
    assert [c.technique for c in candidates(hybrid, (1,), 0.6, 0.9, {})] == [BYPASS, TAKEOVER]
    assert [c.technique for c in candidates(hybrid, (0, 1), 0.6, 0.9, {})] == [BYPASS]   # the whole group


def test_the_mesh_does_not_take_over_where_the_choice_is_compensation(images, tmp_path):
    """techniques.json: compensation for {2}, takeover (the default) for {1}. Board 2 killed: nobody loads
    its shards and the answers stay the compensated ones; then board 2 back and board 1 killed: taken over."""
    bundle = tmp_path / "bundle"
    shutil.copytree(ASSETS / "mesh", bundle)
    write_techniques(bundle, Policy(), {(2,): COMPENSATE, (1,): TAKEOVER})
    assert load_techniques(bundle) == {frozenset({2}): COMPENSATE, frozenset({1}): TAKEOVER}
    refs = References(bundle, images)
    cluster, client = start_mesh(bundle, tmp_path / "cluster", TAKEOVER_SETTINGS)
    try:
        cluster.kill(2)
        time.sleep(TAKEOVER_SETTINGS.timeout + 1.0)
        without = [client.infer(images[i:i + 1]) for i in range(5)]
        took_2 = [e for b in (0, 1, 3) for e in cluster.events(b) if e["event"] == "takeover"]
        cluster.restart(2)
        cluster.wait_started([2])
        time.sleep(1.0)
        cluster.kill(1)
        end = time.time() + 5
        while time.time() < end and not any(e["event"] == "takeover" for b in (0, 2, 3) for e in cluster.events(b)):
            client.infer(images[:1])
        time.sleep(0.3)
        taken = [client.infer(images[i:i + 1]) for i in range(5)]
        took_1 = [e for b in (0, 2, 3) for e in cluster.events(b) if e["event"] == "takeover" and e["peer"] == 1]
    finally:
        client.close()
        cluster.close()
    assert not took_2                                       # compensation chosen for {2}: nobody took over
    for i, a in enumerate(without):
        assert a.consistent and a.failed == (2,) and "taken over" not in a.technique
        ref = refs((2,), i)
        assert abs(a.output - ref).max() <= 1e-5 * abs(ref).max()
    assert took_1                                           # takeover chosen (by default) for {1}
    for i, a in enumerate(taken):
        assert a.consistent and a.failed == () and "1 taken over by" in a.technique, (a.failed, a.technique)
        ref = refs((), i)
        assert abs(a.output - ref).max() <= 1e-5 * abs(ref).max()
