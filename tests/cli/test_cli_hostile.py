"""The CLI given hostile input: one line and exit 1 for an error, exit 2 for usage, never a
traceback, and nothing changed (in-process on the FakeBackend, as test_cli_fake.py)."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from netvm import FakeBackend, FakeState
from netvm.backends.base import Backend, LinkSetting
from netvm.cli import main
from netvm.errors import HostError
from netvm.testing import snapshot

ARABIC_1500 = "\u0661\u0665\u0660\u0660"


@dataclass
class Result:
    code: int
    out: str
    err: str

    def error_line(self, command: str) -> str:
        """The one line of an error, checked to be alone and traceback-free."""
        assert self.code == 1, self
        assert "Traceback" not in self.err
        lines = self.err.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"netvm {command}: error: ")
        return lines[0]

    def usage_error(self) -> str:
        assert self.code == 2, self
        assert "Traceback" not in self.err
        assert "usage: netvm" in self.err
        return self.err.splitlines()[-1]


Run = Callable[..., Result]


@pytest.fixture
def state() -> FakeState:
    return FakeState()


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], state: FakeState) -> Run:
    def run(
        *argv: str,
        env: dict[str, str] | None = None,
        factory: Callable[[str | None], Backend] | None = None,
    ) -> Result:
        base = ["--state-dir", str(tmp_path / "state"), "--bridge", "nvbr0"]
        base += ["--subnet", "192.0.2.0/24", "--egress", "up0"]
        code = main(
            [*base, *argv],
            backend_factory=factory or (lambda netns: FakeBackend(state)),
            environ=env or {},
        )
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def host(run: Run, state: FakeState) -> dict[str, object]:
    """A set-up host with one VM; returns its snapshot."""
    assert run("ensure-host").code == 0
    assert run("attach", "vm-a").code == 0
    return snapshot(FakeBackend(state))


# Numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mtu", [ARABIC_1500, "\u00b2", "\uff19\uff10\uff10\uff10", "1" * 5000])
def test_an_mtu_in_other_digits_is_refused_in_one_line(
    run: Run, state: FakeState, mtu: str
) -> None:
    line = run("ensure-host", "--mtu", mtu).error_line("ensure-host")
    assert "invalid --mtu" in line
    assert "an integer from 68 to 65521" in line
    assert list(state.links) == ["lo"]


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--owner", ARABIC_1500, "argument --owner: no such user: "),
        ("--owner", "\u00b2", "argument --owner: no such user: '²'"),
        ("--owner", "4294967295", "argument --owner: out of range 0 to 4294967294"),
        ("--owner", "99999999999999999999", "argument --owner: out of range"),
        ("--owner", "a\x00b", "argument --owner: no such user"),
        ("--owner", "\udcff", "argument --owner: no such user"),
        ("--group", "4294967295", "argument --group: out of range 0 to 4294967294"),
        ("--group", ARABIC_1500, "argument --group: no such group"),
        ("--queues", "\u00b2", "argument --queues: not a positive integer"),
        ("--queues", "257", "argument --queues: out of range 1 to 256"),
        ("--queues", "1" * 5000, "argument --queues: out of range 1 to 256"),
    ],
)
def test_bad_ids_and_counts_are_usage_errors(
    run: Run, state: FakeState, host: dict[str, object], option: str, value: str, expected: str
) -> None:
    line = run("attach", "vm-b", option, value).usage_error()
    assert expected in line
    assert snapshot(FakeBackend(state)) == host


def test_the_largest_uid_and_gid_are_accepted(run: Run, state: FakeState, host: object) -> None:
    result = run("attach", "vm-b", "--owner", "4294967294", "--group", "0", "--json")
    assert result.code == 0, result.err
    assert '"owner": 4294967294' in result.out


# Text ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["attach", "vm-\udcff"], "invalid VM_ID: 'vm-\\udcff': text that UTF-8 can encode"),
        (["detach", "\udc80"], "invalid VM_ID"),
        (["gc", "--keep", "vm-a", "x\udcff"], "invalid --keep: 'x\\udcff'"),
        (["attach", "vm-b", "--guest-device", "e\udcff"], "invalid --guest-device"),
        (["attach", "vm-b", "--hostname", "h\udcff"], "invalid --hostname"),
        (["attach", "vm-b", "--dns", "\udcff"], "invalid --dns"),
        (["attach", "vm-b", "--for", "firecracker", "--iface-id", "\udcff"], "--iface-id"),
        (["list", "--bridge", "br\udcff"], "invalid --bridge"),
        (["list", "--subnet", "192.0.2.0/2\udcff"], "invalid --subnet"),
        (["list", "--state-dir", "/tmp/\udcff"], "invalid --state-dir: '/tmp/\\udcff'"),
        (["list", "--netns", "ns\x00"], "invalid --netns: 'ns\\x00'"),
        (["list", "--netns", ""], "invalid --netns: ''"),
    ],
)
def test_undecodable_arguments_are_refused_in_one_line(
    run: Run, state: FakeState, host: dict[str, object], argv: list[str], expected: str
) -> None:
    """Bytes of argv that are not UTF-8 arrive as lone surrogates (surrogateescape)."""
    line = run(*argv).error_line(argv[0])
    assert expected in line
    assert snapshot(FakeBackend(state)) == host


def test_an_undecodable_variable_is_named(run: Run, state: FakeState) -> None:
    env = {"MICROVM_NETWORK_FIREWALL": "auto\udcff"}
    line = run("ensure-host", env=env).error_line("ensure-host")
    assert "invalid MICROVM_NETWORK_FIREWALL: 'auto\\udcff'" in line
    assert list(state.links) == ["lo"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--subnet", "0.0.0.0/0"], "invalid --subnet: '0.0.0.0/0': a unicast IPv4 network"),
        (["--subnet", "224.0.0.0/24"], "(224.0.0.0/24 overlaps 224.0.0.0/4, multicast)"),
        (["--bridge", "all"], "not 'all' or 'default'"),
        (["--bridge", "up0"], "invalid --egress: 'up0': must differ from the bridge's name"),
    ],
)
def test_configuration_the_kernel_or_a_firewall_would_misread_is_refused(
    run: Run, state: FakeState, argv: list[str], expected: str
) -> None:
    assert expected in run("ensure-host", *argv).error_line("ensure-host")
    assert list(state.links) == ["lo"]


def test_text_stdout_cannot_encode_is_escaped(
    run: Run, host: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A vm_id 'é' listed under LANG=C (an ASCII stdout) is shown escaped, not a crash."""
    assert run("attach", "\u00e9t\u00e9").code == 0
    raw = io.BytesIO()
    ascii_out = io.TextIOWrapper(raw, encoding="ascii")
    monkeypatch.setattr(sys, "stdout", ascii_out)
    result = run("list")
    ascii_out.flush()
    assert result.code == 0, result.err
    assert b"\\xe9t\\xe9" in raw.getvalue()


# Failures that are not netvm's errors ---------------------------------------------------


def test_a_corrupted_lease_store_is_one_line(run: Run, tmp_path: Path, host: object) -> None:
    """Whatever the lease store makes of a damaged file (refuse it, or rebuild from the
    kernel), the CLI never shows a traceback."""
    for db in (tmp_path / "state").glob("*.sqlite*"):
        db.write_bytes(b"this is not a database" * 100)
    for command in ("list", "attach", "gc"):
        argv = {"list": ["list"], "attach": ["attach", "vm-c"], "gc": ["gc", "--keep"]}[command]
        result = run(*argv)
        assert "Traceback" not in result.err
        assert result.code in (0, 1), result
        if result.code == 1:
            result.error_line(command)


def test_an_unexpected_exception_is_one_internal_error_line(run: Run) -> None:
    def broken(netns: str | None) -> Backend:
        raise RuntimeError("something netvm did not expect")

    line = run("status", factory=broken).error_line("status")
    assert "internal error: RuntimeError: something netvm did not expect" in line
    assert "this is a bug in netvm, please report it" in line
    assert "run it again with -v to see the traceback" in line


def test_with_verbose_the_internal_error_shows_its_traceback(run: Run) -> None:
    def broken(netns: str | None) -> Backend:
        raise RuntimeError("boom")

    result = run("status", "-v", factory=broken)
    assert result.code == 1
    assert "Traceback (most recent call last)" in result.err
    assert result.err.splitlines()[-1].startswith("netvm status: error: internal error: ")


def test_an_os_error_is_one_line(run: Run) -> None:
    def full(netns: str | None) -> Backend:
        raise OSError(28, "No space left on device")

    line = run("list", factory=full).error_line("list")
    assert "No space left on device" in line


def test_json_reports_an_internal_error_as_a_document(run: Run) -> None:
    def broken(netns: str | None) -> Backend:
        raise ValueError("odd")

    result = run("list", "--json", factory=broken)
    assert result.code == 1
    assert '"type": "InternalError"' in result.out


def test_an_unusable_state_dir_says_which_option_to_fix(run: Run, state: FakeState) -> None:
    line = run("ensure-host", "--state-dir", "/proc/no-such-dir").error_line("ensure-host")
    assert "/proc/no-such-dir" in line
    assert "--state-dir (MICROVM_NETWORK_STATE_DIR) must be a writable directory" in line
    assert list(state.links) == ["lo"]


def test_a_state_dir_that_is_a_file_is_named_so_with_one_hint(
    run: Run, state: FakeState, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.write_text("")
    line = run("ensure-host", "--state-dir", str(plain)).error_line("ensure-host")
    assert "Not a directory (ENOTDIR)" in line
    assert line.count("must be a writable directory") == 1
    assert "--state-dir (MICROVM_NETWORK_STATE_DIR) must be a writable directory" in line
    assert list(state.links) == ["lo"]


def test_with_json_a_usage_error_is_a_json_document_too(run: Run) -> None:
    result = run("attach", "--json")
    assert "required: VM_ID" in result.usage_error()
    document = json.loads(result.out)
    assert document["version"] == 1
    assert document["error"]["type"] == "UsageError"
    assert "VM_ID" in document["error"]["message"]
    assert run("attach").out == ""  # the control: without --json, nothing on stdout


def test_an_interrupted_attach_of_many_says_what_stays_and_what_to_run(
    run: Run, state: FakeState
) -> None:
    assert run("ensure-host").code == 0
    calls = {"n": 0}

    class Interrupting(FakeBackend):
        def set_links(self, changes: Sequence[LinkSetting]) -> dict[str, HostError]:
            calls["n"] += 1
            raise KeyboardInterrupt

    result = run("attach", "vm-a", "vm-b", "--json", factory=lambda netns: Interrupting(state))
    assert calls["n"] == 1
    assert result.code == 130
    assert "Traceback" not in result.err
    assert "the same command again attaches the rest" in result.err
    assert json.loads(result.out)["error"]["type"] == "Interrupted"
    again = run("attach", "vm-a", "vm-b")  # and it does
    assert again.code == 0, again


def test_attach_again_shows_the_flags_the_tap_was_made_with(run: Run) -> None:
    """IFF_VNET_HDR is not compared on a re-attach (a VMM sets the header size itself):
    what is printed is the TAP's, not the request's."""
    assert run("ensure-host").code == 0
    first = run("attach", "vm-a", "--vnet-hdr", "--json")
    assert json.loads(first.out)["tap"]["vnet_hdr"] is True
    again = run("attach", "vm-a", "--json")
    assert again.code == 0, again
    assert json.loads(again.out)["tap"]["vnet_hdr"] is True
    assert "vnet_hdr=on" in run("attach", "vm-a").out


def test_json_prints_one_document_even_when_interrupted_after_it(
    run: Run, state: FakeState
) -> None:
    """A Ctrl-C while the manager closes, after the command printed its document."""
    assert run("ensure-host").code == 0
    assert run("attach", "vm-1").code == 0

    class InterruptedAtClose(FakeBackend):
        def close(self) -> None:
            super().close()
            raise KeyboardInterrupt

    result = run("detach", "vm-1", "--json", factory=lambda netns: InterruptedAtClose(state))
    assert result.code == 130
    assert "interrupted" in result.err
    document = json.loads(result.out)  # one document: json.loads refuses two
    assert "error" not in document


def test_an_abbreviated_json_option_gets_the_usage_error_as_json(run: Run) -> None:
    result = run("list", "--js", "--bogus")
    assert result.code == 2
    assert json.loads(result.out)["error"]["type"] == "UsageError"
