"""`cloister audit` end to end: real transparency-log data, exit statuses, and hostile servers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.audit.clirun import cli
from tests.audit.logbuilder import LogServer, TestLog, build_log, pcr_args

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tlog"
SUMDB_KEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
TESSERA = FIXTURES / "tessera_testdata_log"


# --- verify-note: any C2SP signed note ------------------------------------------------------


def test_verify_note_accepts_the_real_sum_golang_org_checkpoint() -> None:
    r = cli("audit", "verify-note", "--key", SUMDB_KEY, str(FIXTURES / "signed_note" / "raw" / "sumdb_6476701.note"))
    assert r.code == 0, r.err
    assert "signed by sum.golang.org+033de0ae" in r.out
    assert "go.sum database tree, size 6476701" in r.out


def test_verify_note_accepts_every_checkpoint_of_the_tessera_log() -> None:
    vkey = json.loads((TESSERA / "log.json").read_text())["vkey"]
    files = sorted(TESSERA.glob("checkpoint*"))
    assert len(files) == 17
    for f in files:
        r = cli("audit", "verify-note", "--key", vkey, "--json", str(f))
        assert r.code == 0, (f, r.err)
        out = json.loads(r.out)
        assert out["checkpoint"]["origin"] == "example.com/log/testdata"


def test_verify_note_accepts_the_other_vectors_and_keys_from_a_file(tmp_path: Path) -> None:
    vectors = json.loads((FIXTURES / "signed_note" / "vectors.json").read_text())["vectors"]
    for v in vectors:
        if not v["expect"]["valid"]:
            continue
        keys = tmp_path / f"{v['id']}.keys"
        keys.write_text("# verifier keys\n" + "\n".join(v["verifier_keys"]) + "\n")
        note = tmp_path / f"{v['id']}.note"
        note.write_text(v["note_text_utf8"], encoding="utf-8")
        r = cli("audit", "verify-note", "--key", f"@{keys}", str(note))
        assert r.code == 0, (v["id"], r.err)


def test_verify_note_rejects_a_changed_note_or_the_wrong_key(tmp_path: Path) -> None:
    original = (FIXTURES / "signed_note" / "raw" / "sumdb_6476701.note").read_bytes()
    changed = tmp_path / "changed.note"
    changed.write_bytes(original.replace(b"6476701", b"6476702"))
    r = cli("audit", "verify-note", "--key", SUMDB_KEY, str(changed))
    assert r.code == 1
    assert "does not verify" in r.err
    vkey = json.loads((TESSERA / "log.json").read_text())["vkey"]
    r = cli("audit", "verify-note", "--key", vkey, str(FIXTURES / "signed_note" / "raw" / "sumdb_6476701.note"))
    assert r.code == 1
    assert "signed by no known key" in r.err


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "does not end with a newline"),
        (b"go.sum database tree\n6476701\n", "no blank line"),
        (b"text\n\n\xe2\x80\x94 sum.golang.org !!!\n", "not valid base64"),
        (b"text\n\n" + b"\xff" * 10, "not valid UTF-8 at byte offset 6"),
        (b"text\n\n\xe2\x80\x94 sum.golang.org " + b"A" * 20000 + b"\n", "more than"),
    ],
)
def test_verify_note_malformed_notes_are_clear_errors(tmp_path: Path, data: bytes, message: str) -> None:
    f = tmp_path / "bad.note"
    f.write_bytes(data)
    r = cli("audit", "verify-note", "--key", SUMDB_KEY, str(f))
    assert r.code == 1
    assert message in r.err
    assert "Traceback" not in r.err


def test_verify_note_usage_errors_exit_2(tmp_path: Path) -> None:
    f = tmp_path / "n"
    f.write_bytes(b"x\n\n")
    assert cli("audit", "verify-note", "--key", "not-a-key", str(f)).code == 2
    assert cli("audit", "verify-note", "--key", SUMDB_KEY, str(tmp_path / "missing")).code == 2


# --- replay of a generic tlog-tiles log -------------------------------------------------------


def _tessera_dir(tmp_path: Path, size: int = 15) -> Path:
    """The Tessera test log at `size` in the tlog-tiles layout (it ships as hex in tiles_hex.json)."""
    tiles = json.loads((TESSERA / "tiles_hex.json").read_text())["tiles"]
    d = tmp_path / "tessera"
    for path in (f"tile/0/000.p/{size}", f"tile/entries/000.p/{size}"):
        (d / path).parent.mkdir(parents=True, exist_ok=True)
        (d / path).write_bytes(bytes.fromhex(tiles[path]))
    (d / "checkpoint").write_bytes((TESSERA / f"checkpoint.{size}").read_bytes())
    return d


@pytest.mark.parametrize("size", [1, 7, 15])
def test_replay_generic_recomputes_the_tessera_log(tmp_path: Path, size: int) -> None:
    vkey = json.loads((TESSERA / "log.json").read_text())["vkey"]
    d = _tessera_dir(tmp_path, size)
    r = cli("audit", "replay", "--generic", "--key", vkey, "--log", str(d), "--json", "--no-progress")
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["tree_size"] == size and out["ok"] and out["root"] == out["checkpoint_root"]


def test_replay_generic_reports_a_tampered_tessera_tile(tmp_path: Path) -> None:
    vkey = json.loads((TESSERA / "log.json").read_text())["vkey"]
    d = _tessera_dir(tmp_path)
    bundle = d / "tile/entries/000.p/15"
    data = bytearray(bundle.read_bytes())
    data[-1] ^= 0x20  # "fivten" -> "fivteN"
    bundle.write_bytes(bytes(data))
    r = cli("audit", "replay", "--generic", "--key", vkey, "--log", str(d), "--no-progress")
    assert r.code == 1
    assert "tile/0/000.p/15: 1 of its 15 hashes differ" in r.err
    assert "hash 14 (byte offset 448, leaves 14)" in r.err
    assert "the root recomputed from the 15 entries" in r.err


def test_replay_generic_needs_a_key(tmp_path: Path) -> None:
    r = cli("audit", "replay", "--generic", "--log", str(_tessera_dir(tmp_path)), "--no-progress")
    assert r.code == 2


# --- a real Cloister log through the CLI ------------------------------------------------------


@pytest.fixture(scope="module")
def real_log(tmp_path_factory: pytest.TempPathFactory) -> TestLog:
    return build_log(tmp_path_factory.mktemp("cli-log"), rounds=2)


def test_every_verb_on_a_real_log(real_log: TestLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --trust-root mock reads $CLOISTER_STATE/mock-nsm/root.pem, as `cloister attest verify --root mock`.
    monkeypatch.setenv("CLOISTER_STATE", str(real_log.workdir))
    with LogServer(real_log.dir, real_log.attest) as srv:
        common = ["--log", srv.url, "--trust-root", "mock", *pcr_args(real_log.pcrs)]
        r = cli("audit", "checkpoint", *common)
        assert r.code == 0, r.err
        assert "first checkpoint seen for this log" in r.out
        assert (real_log.workdir / "audit" / "checkpoints").is_dir()  # default state: $CLOISTER_STATE/audit
        r = cli("audit", "checkpoint", *common, "--json")
        assert r.code == 0 and json.loads(r.out)["consistency"]["status"] == "same"
        r = cli("audit", "inclusion", *common, "--index", "2")
        assert r.code == 0, r.err
        assert json.loads(r.out)["entry"]["type"] == "decision"
        r = cli("audit", "consistency", *common, "--from", "3", "--to", "9")
        assert r.code == 0 and r.out.rstrip().endswith("consistent")
        r = cli("audit", "replay", *common, "--no-progress")
        assert r.code == 0, r.err
        assert "key introductions:" in r.out and "refund-bot" in r.out
        r = cli("audit", "receipt", *common, "--index", "2")
        assert r.code == 0, r.err
        receipt = tmp_path / "receipt"
        receipt.write_bytes(r.raw)
    # Offline, with the server gone.
    r = cli("audit", "verify-receipt", str(receipt), "--trust-root", "mock", *pcr_args(real_log.pcrs))
    assert r.code == 0, r.err
    assert "receipt verified: entry 2" in r.out


def test_usage_errors_exit_2(real_log: TestLog, tmp_path: Path) -> None:
    root = ["--trust-root", str(real_log.root_pem), "--state", str(tmp_path / "s")]
    assert cli("audit", "checkpoint", "--log", str(real_log.dir), *root).code == 2  # a directory cannot attest
    assert cli("audit", "checkpoint", "--log", "ftp://x/", *root).code == 2
    assert cli("audit", "checkpoint", "--log", "http://127.0.0.1:9/", "--trust-root", str(tmp_path / "none")).code == 2
    assert cli("audit", "checkpoint", "--log", "http://127.0.0.1:9/", *root, "--expect-pcr", "0=zz").code == 2
    assert cli("audit", "replay", "--log", str(tmp_path / "nowhere"), *root, "--no-progress").code == 2
    with pytest.raises(SystemExit) as exc:
        cli("audit", "inclusion", "--log", "http://127.0.0.1:9/", "--index", "-1")
    assert exc.value.code == 2


# --- servers that fail: exit 3, and never a hang --------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                held.append(conn)
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/log/"
    stop.set()
    t.join()
    for c in held:
        c.close()
    sock.close()


def test_a_server_that_never_answers_times_out_with_exit_3(
    silent_server: str, tmp_path: Path, real_log: TestLog
) -> None:
    started = time.monotonic()
    r = cli(
        "audit",
        "checkpoint",
        "--log",
        silent_server,
        "--trust-root",
        str(real_log.root_pem),
        "--state",
        str(tmp_path),
        "--timeout",
        "0.5",
    )
    assert r.code == 3
    assert "timed out" in r.err and "attestation" in r.err
    assert time.monotonic() - started < 5
    r = cli(
        "audit",
        "replay",
        "--log",
        silent_server,
        "--trust-root",
        str(real_log.root_pem),
        "--state",
        str(tmp_path),
        "--timeout",
        "0.5",
        "--no-progress",
    )
    assert r.code == 3


def test_a_refused_connection_and_http_errors_exit_3(real_log: TestLog, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    r = cli(
        "audit",
        "checkpoint",
        "--log",
        f"http://127.0.0.1:{port}/",
        "--trust-root",
        str(real_log.root_pem),
        "--state",
        str(tmp_path),
    )
    assert r.code == 3 and "cannot read the log" in r.err
    with LogServer(real_log.dir, real_log.attest) as srv:
        srv.overrides.append(lambda path, q: (503, b"enclave unavailable") if path == "attestation" else None)
        r = cli(
            "audit", "checkpoint", "--log", srv.url, "--trust-root", str(real_log.root_pem), "--state", str(tmp_path)
        )
        assert r.code == 3
        assert "HTTP 503" in r.err and "enclave unavailable" in r.err
