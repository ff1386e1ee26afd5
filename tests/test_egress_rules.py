"""Egress rules: the parser, the matcher, presets, storage and `vmctl policy`."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmctl import egress
from vmctl.errors import ConfigError

VMCTL = [sys.executable, "-m", "vmctl"]


def ip(text: str) -> egress.IPAddress:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("PyPI.org", "pypi.org"),
        ("pypi.org:443", "pypi.org:443"),
        ("*.npmjs.org", "*.npmjs.org"),
        ("*.npmjs.org:443", "*.npmjs.org:443"),
        ("10.0.0.0/8:5432", "10.0.0.0/8:5432"),
        ("127.0.0.1:8000", "127.0.0.1/32:8000"),
        ("[::1]:8000", "[::1/128]:8000"),
        ("[fd00::/8]:22", "[fd00::/8]:22"),
        ("localhost", "localhost"),
    ],
)
def test_rules_parse_to_their_canonical_target(text: str, target: str) -> None:
    assert egress.parse_rule("allow", text).target == target


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("*", "wider than allowed"),
        ("*.com", "wider than allowed"),
        ("*.com:443", "wider than allowed"),
        ("10.0.0.0/8", "CIDR needs a port"),
        ("127.0.0.1", "CIDR needs a port"),
        ("::1", "CIDR needs a port"),
        ("[::1]", "needs a port"),
        ("10.0.0.1/8:80", "no CIDR"),
        ("pypi.org:0", "invalid port"),
        ("pypi.org:99999", "invalid port"),
        ("pypi.org:https", "invalid port"),
        ("foo*.org", "cannot parse"),
        ("*.*.org", "cannot parse"),
        ("http://pypi.org", "is a URL"),
        ("a b", "cannot parse"),
        ("1.2.3", "cannot parse"),
        ("", "cannot parse"),
        ("bad_\x1b[2J.org", "cannot parse"),
    ],
)
def test_bad_rules_are_one_clear_error(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        egress.parse_rule("allow", text)


def test_patterns_match_subdomains_only_and_ports_when_given() -> None:
    r = egress.parse_rule("allow", "*.npmjs.org:443")
    assert r.matches_name("registry.npmjs.org", 443)
    assert r.matches_name("a.b.npmjs.org", 443)
    assert not r.matches_name("npmjs.org", 443)
    assert not r.matches_name("evilnpmjs.org", 443)
    assert not r.matches_name("registry.npmjs.org", 80)
    any_port = egress.parse_rule("allow", "pypi.org")
    assert any_port.matches_name("pypi.org", 8443) and not any_port.matches_name("x.pypi.org", 1)


def policy(preset: str, *rules: tuple[str, str]) -> egress.Policy:
    return egress.Policy(egress.preset(preset), tuple(egress.parse_rule(a, t) for a, t in rules))


def test_deny_wins_over_allow_and_preset() -> None:
    p = policy("balanced", ("allow", "*.example.test"), ("deny", "bad.example.test"))
    assert p.check_name("good.example.test", 80).allowed
    d = p.check_name("bad.example.test", 80)
    assert not d.allowed and d.rule == "deny bad.example.test (global)"
    p = policy("balanced", ("deny", "pypi.org:443"))
    assert not p.check_name("pypi.org", 443).allowed
    p = policy("open", ("deny", "*.tracker.test"))
    assert not p.check_name("x.tracker.test", 443).allowed
    assert p.check_name("anything.test", 443).allowed


def test_balanced_allows_registries_by_name_and_nothing_else() -> None:
    p = policy("balanced")
    assert p.check_name("pypi.org", 443).rule == "allow pypi.org:443 (preset balanced)"
    assert p.check_name("registry.npmjs.org", 443).allowed
    assert p.check_name("deb.debian.org", 80).allowed
    d = p.check_name("example.com", 443)
    assert not d.allowed and d.rule.startswith("default: no rule allows example.com:443")
    assert not policy("locked").check_name("pypi.org", 443).allowed


NON_PUBLIC = ["127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "::ffff:127.0.0.1",
              "192.168.1.1", "fe80::1", "0.0.0.0"]  # fmt: skip


@pytest.mark.parametrize("addr", NON_PUBLIC)
def test_non_public_addresses_are_refused_even_under_open(addr: str) -> None:
    p = policy("open", ("allow", "evil.test"), ("allow", "0.0.0.0/0:80"))
    by_name = p.check_name("evil.test", 80)
    assert by_name.allowed
    d = p.check_address(ip(addr), 80, by_name)  # a name that resolves there (rebinding)
    assert not d.allowed and d.rule.startswith("never:"), d
    assert not p.check_address(ip(addr), 80, None).allowed  # the IP literal


def test_metadata_address_is_named_as_such() -> None:
    d = policy("open").check_address(ip("169.254.169.254"), 80, None)
    assert d.rule == "never: metadata address 169.254.169.254 (needs a CIDR rule)"


def test_a_cidr_rule_naming_loopback_opens_exactly_it() -> None:
    p = policy("open", ("allow", "127.0.0.1:8000"))
    assert p.check_address(ip("127.0.0.1"), 8000, None).allowed
    assert not p.check_address(ip("127.0.0.1"), 8001, None).allowed
    assert not p.check_address(ip("127.0.0.2"), 8000, None).allowed
    p = policy("open", ("allow", "127.0.0.1:8000"), ("deny", "127.0.0.0/8:8000"))
    assert not p.check_address(ip("127.0.0.1"), 8000, None).allowed


def test_ip_literals_need_a_cidr_rule_even_under_open() -> None:
    p = policy("open")
    d = p.check_address(ip("93.184.216.34"), 443, None)
    assert not d.allowed and "IP literal" in d.rule
    p = policy("open", ("allow", "93.184.216.0/24:443"))
    assert p.check_address(ip("93.184.216.34"), 443, None).allowed
    public_by_name = p.check_name("example.com", 443)
    assert p.check_address(ip("1.1.1.1"), 443, public_by_name).allowed


def test_presets_parse_and_unknown_preset_is_refused() -> None:
    assert set(egress.presets()) == {"locked", "balanced", "open"}
    with pytest.raises(ConfigError, match="unknown policy preset 'wide'"):
        egress.preset("wide")


def test_resolve_parses_host_and_address() -> None:
    assert egress.resolve_map(["pkg.test:127.0.0.1", "v6.test:[::1]"]) == {
        "pkg.test": ["127.0.0.1"],
        "v6.test": ["::1"],
    }
    for bad in ("pkg.test", "pkg.test:nope", ":1.2.3.4", "a b:1.2.3.4"):
        with pytest.raises(ConfigError):
            egress.parse_resolve(bad)


def test_storage_is_strict(vmctl_home: Path) -> None:
    egress.add_rule(egress.parse_rule("allow", "pypi.org"))
    egress.add_rule(egress.parse_rule("deny", "pypi.org", "box"))
    assert [r.label for r in egress.load_rules()] == [
        "allow pypi.org (global)",
        "deny pypi.org (for box)",
    ]
    f = egress.rules_file()
    data = json.loads(f.read_text())
    data["rules"].append({"action": "allow", "target": "*"})
    f.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="rule 2: rule '\\*' is wider than allowed"):
        egress.load_rules()


def vmctl(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"VMCTL_HOME": str(home), "PATH": "/usr/bin:/bin", "VMCTL_QUIET": "1"}
    import os

    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    return subprocess.run([*VMCTL, *args], env=env, capture_output=True, text=True, timeout=60)


def test_policy_cli_round_trip_and_bad_input(vmctl_home: Path) -> None:
    ok = vmctl(vmctl_home, "policy", "allow", "*.npmjs.org:443")
    assert ok.returncode == 0 and "added: allow *.npmjs.org:443 (global)" in ok.stdout
    assert vmctl(vmctl_home, "policy", "deny", "pypi.org", "--for", "shell").returncode == 0
    for args, says in [
        (("allow", "*"), "wider than allowed"),
        (("allow", "*.com"), "wider than allowed"),
        (("allow", "10.0.0.0/8"), "a CIDR needs a port"),
        (("allow", "foo*bar"), "cannot parse"),
        (("deny", "x.org", "--for", "nosuch"), "'nosuch' is neither a guest nor a client"),
        (("rm", "never.test"), "no global rule for never.test"),
        (("rm", "x.org", "--for", "nosuch"), "'nosuch' is neither a guest nor a client"),
        (("ls", "--for", "nosuch"), "'nosuch' is neither a guest nor a client"),
        (("log", "--for", "nosuch"), "'nosuch' is neither a guest nor a client"),
    ]:
        r = vmctl(vmctl_home, "policy", *args)
        assert r.returncode != 0 and says in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    listed = json.loads(vmctl(vmctl_home, "policy", "ls", "--json").stdout)
    assert [(x["action"], x["target"], x["for"]) for x in listed["rules"]] == [
        ("allow", "*.npmjs.org:443", None),
        ("deny", "pypi.org", "shell"),
    ]  # nothing half-applied by the refused commands
    assert "pypi.org:443" in listed["presets"]["balanced"]["allow"]
    assert vmctl(vmctl_home, "policy", "rm", "*.npmjs.org:443").returncode == 0
    r = vmctl(vmctl_home, "policy", "ls", "--json")
    assert [x["target"] for x in json.loads(r.stdout)["rules"]] == ["pypi.org"]
    r = vmctl(vmctl_home, "policy", "allow", "a.test:80", "--for", "codex", "--json")
    assert json.loads(r.stdout) == {
        "result": "added",
        "rule": {"action": "allow", "target": "a.test:80", "for": "codex",
                 "label": "allow a.test:80 (for codex)"},
    }  # fmt: skip


def test_a_removed_guests_rules_can_still_be_listed_and_removed(vmctl_home: Path) -> None:
    """Rules outlive the guest they were for: its name stays usable where they are."""
    from vmctl import egress

    egress.add_rule(egress.parse_rule("allow", "old.test:443", "gone-box"))
    r = vmctl(vmctl_home, "policy", "ls", "--for", "gone-box", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["rules"][0]["for"] == "gone-box"
    r = vmctl(vmctl_home, "policy", "rm", "old.test:443", "--for", "gone-box", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["result"] == "removed"
    assert egress.load_rules() == []


def test_policy_adds_the_proxy_guestfwd_on_the_guarded_path() -> None:
    from vmctl.paths import InstancePaths
    from vmctl.vm.qemu import net_argv
    from vmctl.vm.spec import InstanceSpec

    root = InstancePaths(Path("/st/instances/t1"))
    spec = InstanceSpec(
        "t1", Path("/ws"), net="model", model_endpoint=("127.0.0.1", 8080), policy="open"
    )
    netdev = net_argv(spec, root)[1]
    assert "restrict=on" in netdev
    assert netdev.endswith(
        ",guestfwd=tcp:10.0.2.2:8080-cmd:/st/instances/t1/relay"
        ",guestfwd=tcp:10.0.2.2:3128-cmd:/st/instances/t1/proxy-connect"
    )
    for kw, says in [
        ({"policy": "wide"}, "unknown policy preset"),
        ({"policy": "open", "resolve": ("x.test",)}, "--resolve 'x.test' is not HOST:ADDR"),
    ]:
        with pytest.raises(ConfigError, match=says):
            InstanceSpec("t1", Path("/ws"), net="model", model_endpoint=("h", 1), **kw)  # type: ignore[arg-type]


def test_up_and_run_refuse_bad_policy_flags_in_one_line(vmctl_home: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    for args, says in [
        (("up", "-d", str(ws), "--net", "none", "--policy", "open"), "needs a network"),
        (("up", "-d", str(ws), "--net", "full", "--policy", "locked"), "disagree"),
        (("run", "shell", "-w", str(ws), "--policy", "wide"), "unknown policy preset 'wide'"),
        (("run", "shell", "-w", str(ws), "--resolve", "a.test:1.2.3.4"), "needs the egress proxy"),
    ]:
        r = vmctl(vmctl_home, *args)
        assert r.returncode != 0 and says in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert not (vmctl_home / "instances").exists() or not any((vmctl_home / "instances").iterdir())
