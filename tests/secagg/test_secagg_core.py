"""The SecAgg+ core pins the math: the unmasked sum is the exact modular sum."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from flowerpress.secagg import crypto, shamir
from flowerpress.secagg.core import (
    ClientSession,
    SecAggAbort,
    SecAggViolation,
    ServerSession,
    StageError,
    client_advertise,
    client_mask,
    client_share_keys,
    client_unmask,
)
from flowerpress.secagg.graph import communication_graph, default_degree


def run_protocol(inputs: Mapping[int, np.ndarray], *, bits: int, fraction: float = 0.7,
                 degree: int = 0, drop_after_masking: Sequence[int] = (),
                 drop_before_masking: Sequence[int] = (),
                 lying_holder: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Every stage for every device in order, as the Grid would route it."""
    nodes = sorted(inputs)
    length = len(next(iter(inputs.values())))
    server = ServerSession(round_id=3, nodes=nodes, bits=bits, length=length,
                           fraction=fraction, degree=degree or default_degree(len(nodes)),
                           seed=11)
    sessions: dict[int, ClientSession] = {}
    for n in nodes:
        setup = server.setup_for(n)
        sessions[n], keys = client_advertise(node=n, round_id=setup["round"], bits=bits,
                                             length=length, threshold=setup["threshold"],
                                             neighbours=setup["neighbours"])
        server.add_keys(n, keys)
    server.close_keys()
    for n in nodes:
        sessions[n], cts = client_share_keys(sessions[n], server.roster_for(n))
        server.add_shares(n, cts)
    server.close_shares()
    for n in nodes:
        if n in drop_before_masking:
            continue
        sessions[n], y, complaints = client_mask(sessions[n], server.inbox_for(n), inputs[n])
        if n not in drop_after_masking:
            server.add_masked(n, y, complaints)
    survivors = server.close_masked()
    for n in survivors:
        alive, dropped = server.unmask_request(n)
        sessions[n], b, sk = client_unmask(sessions[n], alive, dropped)
        if n == lying_holder:  # well-formed shares with wrong values
            b = {owner: os.urandom(len(share)) for owner, share in b.items()}
            with pytest.raises(SecAggViolation, match="commitment"):
                server.add_unmask(n, b, sk)
            continue
        server.add_unmask(n, b, sk)
    total = server.finish()
    assert set(server.culprits) == ({lying_holder} if lying_holder is not None else set())
    return total, survivors


def _inputs(n: int, length: int, bits: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {100 + 7 * i: rng.integers(0, 1 << bits, size=length, dtype=np.uint64)
            for i in range(n)}


def _modsum(vectors: Sequence[np.ndarray], bits: int) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        total += v
    return total & np.uint64((1 << bits) - 1)


@pytest.mark.parametrize(("n", "bits", "degree"), [(5, 16, 0), (10, 8, 0), (24, 12, 6)])
def test_unmasked_sum_is_the_exact_modular_sum(n: int, bits: int, degree: int) -> None:
    # Prepare
    inputs = _inputs(n, 33, bits)
    # Execute
    total, survivors = run_protocol(inputs, bits=bits, degree=degree)
    # Assert
    assert survivors == sorted(inputs)
    np.testing.assert_array_equal(total, _modsum(list(inputs.values()), bits))


@pytest.mark.parametrize(("n", "degree", "fraction"), [(10, 0, 0.7), (30, 14, 0.6), (60, 0, 0.7)])
def test_thirty_percent_dropping_after_masking_is_recovered(n: int, degree: int,
                                                             fraction: float) -> None:
    # Prepare: 30 % of the cohort vanish after sending their masked input (in a
    # k-regular graph a neighbourhood can lose more than 30 %: threshold 0.6)
    inputs = _inputs(n, 17, 16, seed=1)
    nodes = sorted(inputs)
    gone = sorted(np.random.default_rng(5).choice(nodes, size=3 * n // 10, replace=False))
    # Execute: their input never reaches the server
    total, survivors = run_protocol(inputs, bits=16, degree=degree, fraction=fraction,
                                   drop_after_masking=gone)
    # Assert
    assert set(survivors) == set(nodes) - set(gone)
    np.testing.assert_array_equal(total, _modsum([inputs[s] for s in survivors], 16))


def test_dropping_before_masking_is_recovered_too() -> None:
    inputs = _inputs(10, 9, 16, seed=2)
    gone = sorted(inputs)[:2]
    total, survivors = run_protocol(inputs, bits=16, drop_before_masking=gone)
    np.testing.assert_array_equal(total, _modsum([inputs[s] for s in survivors], 16))


def test_a_holder_revealing_wrong_shares_is_caught_and_outvoted() -> None:
    # Prepare: 10 devices, one of which reveals random (well-formed) shares
    inputs = _inputs(10, 9, 16, seed=4)
    # Execute: the share commitments catch it; the others' shares suffice
    total, _ = run_protocol(inputs, bits=16, lying_holder=sorted(inputs)[3])
    # Assert
    np.testing.assert_array_equal(total, _modsum(list(inputs.values()), 16))


def test_beyond_the_threshold_the_round_is_refused() -> None:
    # Prepare: threshold 0.7 of 10 needs 7 survivors; 4 drop
    inputs = _inputs(10, 5, 16, seed=3)
    # Execute / Assert
    with pytest.raises(SecAggAbort, match="threshold needs 7"):
        run_protocol(inputs, bits=16, drop_after_masking=sorted(inputs)[:4])


def test_a_survivor_refuses_a_second_unmask_request() -> None:
    # Prepare
    server = ServerSession(round_id=1, nodes=[1, 2, 3], bits=8, length=4, fraction=0.7,
                           degree=2, seed=0)
    sessions = {}
    for n in (1, 2, 3):
        s = server.setup_for(n)
        sessions[n], keys = client_advertise(node=n, round_id=1, bits=8, length=4,
                                             threshold=s["threshold"],
                                             neighbours=s["neighbours"])
        server.add_keys(n, keys)
    server.close_keys()
    for n in (1, 2, 3):
        sessions[n], cts = client_share_keys(sessions[n], server.roster_for(n))
        server.add_shares(n, cts)
    server.close_shares()
    for n in (1, 2, 3):
        sessions[n], _, _ = client_mask(sessions[n], server.inbox_for(n),
                                        np.zeros(4, dtype=np.uint64))
    answered, _, _ = client_unmask(sessions[1], [1, 2, 3], [])
    # Execute / Assert: asking again (e.g. with 2 as dropped) is refused
    with pytest.raises(StageError, match="stage 4"):
        client_unmask(answered, [1, 3], [2])
    with pytest.raises(StageError, match="both alive and dropped"):
        client_unmask(sessions[1], [1, 2, 3], [2])


def test_server_rejects_malformed_and_replayed_messages() -> None:
    server = ServerSession(round_id=1, nodes=[1, 2, 3], bits=8, length=4, fraction=0.7,
                           degree=2, seed=0)
    _session, keys = client_advertise(node=1, round_id=1, bits=8, length=4, threshold=3,
                                     neighbours=[2, 3])
    server.add_keys(1, keys)
    with pytest.raises(SecAggViolation, match="replay"):
        server.add_keys(1, keys)
    with pytest.raises(SecAggViolation, match="32 bytes"):
        server.add_keys(2, type(keys)(b"x", keys.s_pk, keys.b_commit))


def test_session_survives_its_record() -> None:
    session, _ = client_advertise(node=5, round_id=2, bits=8, length=3, threshold=2,
                                  neighbours=[6])
    assert ClientSession.from_record(session.to_record()) == session


def test_shamir_threshold_and_inconsistency() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, threshold=3, holders=[5, 9, 11, 40])
    assert shamir.combine({h: shares[h] for h in (9, 11, 40)}) == secret
    with contextlib.suppress(ValueError):  # too few shares: another value (or out of range)
        assert shamir.combine({h: shares[h] for h in (5, 9)}) != secret


def test_prg_is_deterministic_uniform_and_stream_separated() -> None:
    seed = bytes(32)
    a = crypto.prg(seed, 4096, 8)
    assert np.array_equal(a, crypto.prg(seed, 4096, 8))
    assert not np.array_equal(a, crypto.prg(seed, 4096, 8, stream=1))
    counts = np.bincount(a.astype(np.int64), minlength=256)
    assert counts.min() > 0 and a.max() < 256


def test_graph_is_regular_and_symmetric() -> None:
    graph = communication_graph(list(range(1, 41)), degree=8, seed=4)
    assert {len(v) for v in graph.values()} == {8}
    assert all(u in graph[v] for u in graph for v in graph[u])
