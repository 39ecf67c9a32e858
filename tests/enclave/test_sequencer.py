"""The log sequencer on its own: indexes, signed checkpoints, group commit and back-pressure.

Checkpoints are checked the way an auditor checks them: the signed note against the log key's
published verifier key, and the root against an RFC 9162 Merkle tree hash computed here from the
raw entries with hashlib, not with the sequencer's compact range.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloister.enclave.sequencer import Backpressure, Sequencer, SignedCheckpoint
from cloister.verify.checkpoint import Checkpoint, verify_checkpoint
from cloister.verify.errors import VerificationError
from cloister.verify.merkle import CompactRange, leaf_hash, root_from_leaf_hashes
from cloister.verify.note import Ed25519NoteSigner, Ed25519NoteVerifier, NoteSignature

pytestmark = pytest.mark.timeout(10)

ORIGIN = "cloister.test/sequencer"


class CountingSigner(Ed25519NoteSigner):
    """A log signer that counts its signatures and can hold the first one until told to go on."""

    def __init__(self, name: str = ORIGIN) -> None:
        super().__init__(name, Ed25519PrivateKey.generate())
        self.count = 0
        self.signing = threading.Event()  # set once a signature has started
        self.gate = threading.Event()  # signatures wait for this
        self.gate.set()
        self._count_lock = threading.Lock()

    def sign(self, text: bytes) -> NoteSignature:
        with self._count_lock:
            self.count += 1
        self.signing.set()
        assert self.gate.wait(5), "the test never opened the signer's gate"
        return super().sign(text)


def mth(entries: Sequence[bytes]) -> bytes:
    """RFC 9162 §2.1.1 Merkle Tree Hash, written out from the RFC (no cloister code)."""
    if not entries:
        return hashlib.sha256(b"").digest()
    if len(entries) == 1:
        return hashlib.sha256(b"\x00" + entries[0]).digest()
    k = 1 << ((len(entries) - 1).bit_length() - 1)  # the largest power of two below n
    return hashlib.sha256(b"\x01" + mth(entries[:k]) + mth(entries[k:])).digest()


def entry(i: int) -> bytes:
    return f"entry {i}".encode()


def verified(cp: SignedCheckpoint, signer: Ed25519NoteSigner) -> Checkpoint:
    """The checkpoint as an auditor who knows only the published verifier key reads it."""
    verifier = Ed25519NoteVerifier.from_vkey(signer.vkey)
    return verify_checkpoint(cp.note, [verifier], origin=ORIGIN).checkpoint


def run_threads(targets: Sequence[Callable[[], None]], timeout: float = 5.0) -> None:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a sequencer caller hung"


def test_appends_get_consecutive_indexes_from_zero() -> None:
    seq = Sequencer(ORIGIN, CountingSigner())
    assert seq.size == 0
    assert [seq.append(entry(i)) for i in range(10)] == list(range(10))
    assert seq.size == 10
    assert seq.tree().root() == mth([entry(i) for i in range(10)])


def test_concurrent_appends_get_distinct_consecutive_indexes() -> None:
    seq = Sequencer(ORIGIN, CountingSigner())
    got: list[int] = []
    got_lock = threading.Lock()

    def appender(worker: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(50):
                index = seq.append(f"w{worker}-{i}".encode())
                with got_lock:
                    got.append(index)

        return run

    run_threads([appender(k) for k in range(8)])
    assert sorted(got) == list(range(400))
    # The buffered entries are the log in index order, and the tree is their tree.
    first, buffered = seq.pending_from(0)
    assert first == 0 and len(buffered) == 400
    assert seq.tree().root() == mth(buffered)


def test_a_checkpoint_is_signed_and_its_root_is_the_merkle_tree_hash() -> None:
    signer = CountingSigner()
    seq = Sequencer(ORIGIN, signer)
    entries = [entry(i) for i in range(7)]
    for e in entries:
        seq.append(e)
    cp = seq.checkpoint_covering(5)
    assert cp.size == 7  # it signs the whole tree, which covers the 5 asked for
    parsed = verified(cp, signer)
    assert (parsed.origin, parsed.size, parsed.root_hash) == (ORIGIN, 7, cp.root)
    assert cp.root == mth(entries) == root_from_leaf_hashes([leaf_hash(e) for e in entries])
    assert parsed.extensions == ()


def test_a_checkpoint_does_not_verify_under_another_key_or_origin() -> None:
    signer = CountingSigner()
    seq = Sequencer(ORIGIN, signer)
    seq.append(b"x")
    cp = seq.checkpoint_covering(1)
    with pytest.raises(VerificationError, match="no known key"):
        verify_checkpoint(cp.note, [CountingSigner().verifier], origin=ORIGIN)
    with pytest.raises(VerificationError, match="origin"):
        verify_checkpoint(cp.note, [signer.verifier], origin="another.log/origin")


def test_an_empty_log_has_a_signed_checkpoint_of_size_zero() -> None:
    signer = CountingSigner()
    cp = Sequencer(ORIGIN, signer).latest_checkpoint()
    assert cp.size == 0 and cp.root == hashlib.sha256(b"").digest()
    assert verified(cp, signer).size == 0


def test_a_covered_size_reuses_the_last_checkpoint_and_a_new_entry_gets_a_new_one() -> None:
    signer = CountingSigner()
    seq = Sequencer(ORIGIN, signer)
    seq.append(entry(0))
    seq.append(entry(1))
    first = seq.checkpoint_covering(2)
    assert seq.checkpoint_covering(1) is first and seq.checkpoint_covering(2) is first
    assert seq.latest_checkpoint() is first
    assert signer.count == 1
    seq.append(entry(2))
    second = seq.checkpoint_covering(3)
    assert signer.count == 2 and second.size == 3
    assert verified(second, signer).root_hash == mth([entry(i) for i in range(3)])
    # An older size is still answered by the newest checkpoint, never an older one.
    assert seq.checkpoint_covering(1) is second


def test_group_commit_when_everything_is_appended_first_signs_once() -> None:
    signer = CountingSigner()
    seq = Sequencer(ORIGIN, signer)
    n = 32
    for i in range(n):
        seq.append(entry(i))
    results: dict[int, SignedCheckpoint] = {}

    def waiter(index: int) -> Callable[[], None]:
        def run() -> None:
            results[index] = seq.checkpoint_covering(index + 1)

        return run

    run_threads([waiter(i) for i in range(n)])
    # Whoever signs first signs the whole tree; every other caller shares that one signature.
    assert signer.count == 1
    assert {id(cp) for cp in results.values()} == {id(results[0])}
    assert verified(results[0], signer).size == n


def test_group_commit_callers_that_arrive_during_a_signature_share_the_next_one() -> None:
    """One caller is signing (held at the gate) while 31 others append and ask for checkpoints.

    Without group commit each caller would sign its own checkpoint (32 signatures); with it,
    the held signature and one more for everyone who queued behind it are enough.
    """
    signer = CountingSigner()
    signer.gate.clear()
    seq = Sequencer(ORIGIN, signer)
    n = 32
    results: dict[int, tuple[int, SignedCheckpoint]] = {}

    def caller(worker: int) -> None:
        index = seq.append(entry(worker))
        results[worker] = (index, seq.checkpoint_covering(index + 1))

    leader = threading.Thread(target=caller, args=(0,), daemon=True)
    leader.start()
    assert signer.signing.wait(5), "the first caller never started signing"
    others = [threading.Thread(target=caller, args=(k,), daemon=True) for k in range(1, n)]
    for t in others:
        t.start()
    deadline = time.monotonic() + 5
    while seq.size < n:  # everyone has appended (they then queue behind the held signature)
        assert time.monotonic() < deadline, "appends did not finish"
        time.sleep(0.001)
    signer.gate.set()
    for t in [leader, *others]:
        t.join(5)
        assert not t.is_alive(), "a checkpoint_covering caller hung"

    assert len(results) == n
    assert signer.count <= 2 < n
    entries = seq.pending_from(0)[1]
    for index, cp in results.values():
        assert cp.size >= index + 1, f"entry {index} got a checkpoint of size {cp.size}"
        parsed = verified(cp, signer)
        assert parsed.size == cp.size and parsed.root_hash == mth(entries[: cp.size])


def test_a_failed_signature_does_not_wedge_the_sequencer() -> None:
    signer = CountingSigner()
    seq = Sequencer(ORIGIN, signer)
    seq.append(b"x")
    seq.set_extensions(("bad\x01line",))  # Checkpoint refuses control characters: signing fails
    with pytest.raises(ValueError, match="control character"):
        seq.checkpoint_covering(1)
    seq.set_extensions(())
    done: list[SignedCheckpoint] = []
    run_threads([lambda: done.append(seq.checkpoint_covering(1))], timeout=2)
    assert done[0].size == 1 and verified(done[0], signer).root_hash == mth([b"x"])


def test_set_extensions_appear_in_the_signed_note() -> None:
    signer = CountingSigner()
    seq = Sequencer(ORIGIN, signer)
    seq.append(entry(0))
    with seq.lock:
        seq.set_extensions(("cloister/policy 3 abcd", "cloister/witness ok"))
    cp = seq.checkpoint_covering(1)
    parsed = verified(cp, signer)
    assert parsed.extensions == ("cloister/policy 3 abcd", "cloister/witness ok")
    assert b"\ncloister/policy 3 abcd\ncloister/witness ok\n\n" in cp.note
    # Later checkpoints carry the new lines, and none once they are cleared.
    with seq.lock:
        seq.set_extensions(("cloister/policy 4 ef01",))
    seq.append(entry(1))
    assert verified(seq.checkpoint_covering(2), signer).extensions == ("cloister/policy 4 ef01",)
    with seq.lock:
        seq.set_extensions(())
    seq.append(entry(2))
    assert verified(seq.checkpoint_covering(3), signer).extensions == ()


def test_backpressure_on_entry_count_and_release_lifts_it() -> None:
    seq = Sequencer(ORIGIN, CountingSigner(), max_pending=3)
    for i in range(3):
        seq.append(entry(i))
    with pytest.raises(Backpressure, match="3 log entries are waiting"):
        seq.append(entry(3))
    assert seq.size == 3  # the refused entry got no index
    seq.release(1)
    assert seq.append(entry(3)) == 3
    with pytest.raises(Backpressure):
        seq.append(entry(4))
    seq.release(4)
    assert [seq.append(entry(i)) for i in (4, 5, 6)] == [4, 5, 6]
    assert seq.checkpoint_covering(7).root == mth([entry(i) for i in range(7)])


def test_backpressure_on_bytes_and_release_lifts_it() -> None:
    seq = Sequencer(ORIGIN, CountingSigner(), max_pending_bytes=100)
    seq.append(b"a" * 60)
    seq.append(b"b" * 40)  # exactly at the cap
    with pytest.raises(Backpressure):
        seq.append(b"c")
    seq.release(1)  # frees 60 bytes
    seq.append(b"c" * 60)
    with pytest.raises(Backpressure):
        seq.append(b"d")


def test_release_never_frees_entries_that_were_not_sequenced_or_goes_backwards() -> None:
    seq = Sequencer(ORIGIN, CountingSigner(), max_pending=2)
    seq.append(entry(0))
    seq.release(10**6)  # a parent claiming more than exists frees only what exists
    assert seq.pending_from(0) == (1, [])
    seq.append(entry(1))
    seq.append(entry(2))
    with pytest.raises(Backpressure):
        seq.append(entry(3))
    seq.release(0)  # an old persisted size changes nothing
    assert seq.pending_from(0) == (1, [entry(1), entry(2)])


def test_pending_from_and_pending_range() -> None:
    seq = Sequencer(ORIGIN, CountingSigner())
    for i in range(6):
        seq.append(entry(i))
    assert seq.pending_from(0) == (0, [entry(i) for i in range(6)])
    assert seq.pending_from(4) == (4, [entry(4), entry(5)])
    assert seq.pending_from(6) == (6, [])
    seq.release(3)
    # A start that is no longer buffered gets the oldest buffered entry and its index.
    assert seq.pending_from(0) == (3, [entry(3), entry(4), entry(5)])
    assert seq.pending_from(5) == (5, [entry(5)])
    assert seq.pending_range(3, 2) == [entry(3), entry(4)]
    with pytest.raises(IndexError, match="entry 2 is no longer buffered"):
        seq.pending_range(2, 1)


def test_a_sequencer_resumed_from_a_compact_range_continues_the_same_tree() -> None:
    signer = CountingSigner()
    before = [entry(i) for i in range(5)]
    tree = CompactRange.empty()
    for e in before:
        tree.append(leaf_hash(e))
    seq = Sequencer(ORIGIN, signer, tree)
    tree.append(leaf_hash(b"not in the log"))  # the sequencer keeps its own copy
    assert seq.size == 5
    assert seq.append(entry(5)) == 5
    assert seq.pending_from(0) == (5, [entry(5)])  # only what it sequenced itself is buffered
    cp = seq.checkpoint_covering(6)
    assert verified(cp, signer).root_hash == mth([*before, entry(5)])
