"""Egress rules by destination: parsing, presets, storage and the decision.

A rule allows or denies a destination: a host (`pypi.org`), a pattern
(`*.npmjs.org`, subdomains only), either with an optional port, or a CIDR
with a port (`10.0.0.0/8:5432`, `127.0.0.1:8000`, `[::1]/128:8000`). A
preset (data/egress-presets.toml) is the baseline; the user's rules, global
or `--for NAME`, apply on top of it; a deny always wins.

A connection by name passes two checks: the name (a deny rule refuses it,
an allow rule or the `open` preset admits it) and every address it resolves
to (a deny CIDR refuses it; a non-public address needs an allow CIDR rule
that names it, whatever the preset, so DNS rebinding and localtest.me-style
names never reach loopback). An IP literal needs an allow CIDR rule.

Rules are stored as JSON under the state folder (`policy/rules.json`),
parsed strictly: one bad entry makes the whole file an error, never a
silently shorter list.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from vmctl import paths
from vmctl.errors import ConfigError
from vmctl.state import StateError, read_json, write_json

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
ACTIONS = ("allow", "deny")
_LABEL_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
#: Non-public ranges: reached only through an allow CIDR rule inside one of them.
NAMED_RANGES = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/3",
        "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8",
    )
)  # fmt: skip
_HINT = "e.g. pypi.org, *.npmjs.org:443, 10.0.0.0/8:5432 or 127.0.0.1:8000"


@dataclass(frozen=True)
class Rule:
    """One allow or deny rule; `origin` says where it came from (shown in logs)."""

    action: str
    host: str | None = None  # `pypi.org`, or `*.npmjs.org` for a pattern
    network: IPNetwork | None = None
    port: int | None = None
    scope: str | None = None  # a guest or client name; None: global
    origin: str = "user"

    @property
    def target(self) -> str:
        """The rule's destination as the user writes it (and `policy rm` takes it)."""
        if self.network is not None:
            net = str(self.network)
            return f"[{net}]:{self.port}" if self.network.version == 6 else f"{net}:{self.port}"
        return f"{self.host}:{self.port}" if self.port else str(self.host)

    @property
    def label(self) -> str:
        """`deny pkg.test (for box)`: what a log line and a 403 body name."""
        where = f"preset {self.origin[7:]}" if self.origin.startswith("preset:") else None
        where = where or (f"for {self.scope}" if self.scope else "global")
        return f"{self.action} {self.target} ({where})"

    def matches_name(self, host: str, port: int) -> bool:
        if self.host is None or (self.port is not None and self.port != port):
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:])
        return host == self.host

    def matches_address(self, addr: IPAddress, port: int) -> bool:
        return self.network is not None and self.port == port and addr in self.network

    def names(self, addr: IPAddress) -> bool:
        """An allow CIDR rule names a non-public address when it lies inside its range."""
        net = self.network
        return net is not None and any(
            net.version == r.version and net.subnet_of(r) and addr in r  # type: ignore[arg-type]
            for r in NAMED_RANGES
        )


def _port(text: str, what: str) -> int:
    if not _PORT_RE.match(text) or not 0 < int(text) < 65536:
        raise ConfigError(f"rule {what!r} has an invalid port {text!r}", "ports are 1-65535")
    return int(text)


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def check_host(host: str, what: str) -> str:
    """A DNS name of plain labels, lower-cased; refuses IP-looking and odd names."""
    host = host.lower().rstrip(".")
    labels = host.split(".")
    if (
        not host
        or len(host) > 253
        or not all(_LABEL_RE.match(lb) for lb in labels)
        or labels[-1].isdigit()
    ):
        raise ConfigError(f"cannot parse rule {what!r}", _HINT)
    return host


def parse_rule(action: str, text: str, scope: str | None = None, origin: str = "user") -> Rule:
    """`allow|deny` plus a destination, or ConfigError naming what is wrong."""
    if action not in ACTIONS:
        raise ConfigError(f"unknown rule action {action!r}", "use allow or deny")
    what = text
    text = text.strip().lower()
    if not text or len(text) > 300 or not text.isprintable() or " " in text:
        raise ConfigError(f"cannot parse rule {what!r}", _HINT)
    if "://" in text:
        raise ConfigError(f"rule {what!r} is a URL, not a destination", _HINT)
    if text.startswith("["):  # [v6] or [v6/len], then :port
        inner, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(f"rule {what!r}: an address needs a port", f"e.g. [{inner}]:443")
        return _cidr_rule(action, inner, _port(rest[1:], what), what, scope, origin)
    net_part, slash, after = text.partition("/")
    if _ip(text) is not None or (slash and _ip(net_part) and ":" not in after):
        raise ConfigError(f"rule {what!r}: a CIDR needs a port", f"e.g. {text}:443")
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, ""
    port = _port(port_text, what) if port_text else None
    if "/" in host or _ip(host) is not None:
        assert port is not None
        return _cidr_rule(action, host, port, what, scope, origin)
    if host == "*" or (host.startswith("*.") and "." not in host[2:]):
        raise ConfigError(
            f"rule {what!r} is wider than allowed",
            "a pattern names a domain of at least two labels, e.g. *.npmjs.org",
        )
    name = host[2:] if host.startswith("*.") else host
    if "*" in name:
        raise ConfigError(f"cannot parse rule {what!r}", "'*' may only open a pattern: *.DOMAIN")
    name = check_host(name, what)
    return Rule(action, ("*." if host.startswith("*.") else "") + name, None, port, scope, origin)


def _cidr_rule(
    action: str, net_text: str, port: int, what: str, scope: str | None, origin: str
) -> Rule:
    try:
        network = ipaddress.ip_network(net_text, strict=True)
    except ValueError:
        raise ConfigError(f"cannot parse rule {what!r}: {net_text!r} is no CIDR", _HINT) from None
    return Rule(action, None, network, port, scope, origin)


# --- presets ------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    rules: tuple[Rule, ...]
    public: bool  # any public address, by name


@cache
def presets() -> dict[str, Preset]:
    """The presets of data/egress-presets.toml, every rule parsed."""
    text = paths.data_text("egress-presets.toml")
    out: dict[str, Preset] = {}
    for name, body in tomllib.loads(text).items():
        extra = set(body) - {"description", "allow", "public"}
        if extra:
            raise ValueError(f"egress preset {name}: unknown keys {sorted(extra)}")
        rules = tuple(parse_rule("allow", t, origin=f"preset:{name}") for t in body["allow"])
        out[name] = Preset(name, str(body["description"]), rules, bool(body.get("public")))
    return out


def preset(name: str) -> Preset:
    try:
        return presets()[name]
    except KeyError:
        raise ConfigError(
            f"unknown policy preset {name!r}", f"use one of {', '.join(presets())}"
        ) from None


# --- the decision ---------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # the rule's label, or `default: ...` / `never: ...` when none decided

    @property
    def word(self) -> str:
        return "allow" if self.allowed else "deny"


def is_public(addr: IPAddress) -> bool:
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool((mapped or addr).is_global)


@dataclass(frozen=True)
class Policy:
    """The rules in effect for one guest or client: its preset plus the user's rules."""

    preset: Preset
    rules: tuple[Rule, ...]

    def _all(self) -> tuple[Rule, ...]:
        return (*self.rules, *self.preset.rules)

    def check_name(self, host: str, port: int) -> Decision:
        """The name alone: deny rules first, then allow rules, then the preset."""
        rules = self._all()
        for r in rules:
            if r.action == "deny" and r.matches_name(host, port):
                return Decision(False, r.label)
        for r in rules:
            if r.action == "allow" and r.matches_name(host, port):
                return Decision(True, r.label)
        if self.preset.public:
            return Decision(True, f"preset {self.preset.name}: any public address")
        return Decision(False, f"default: no rule allows {host}:{port} (preset {self.preset.name})")

    def check_address(self, addr: IPAddress, port: int, by_name: Decision | None) -> Decision:
        """One address: deny CIDRs, then non-public ranges, then the name's verdict."""
        mapped = getattr(addr, "ipv4_mapped", None)
        addr = mapped or addr
        rules = self._all()
        for r in rules:
            if r.action == "deny" and r.matches_address(addr, port):
                return Decision(False, r.label)
        allow = next(
            (r for r in rules if r.action == "allow" and r.matches_address(addr, port)), None
        )
        if not is_public(addr):
            if allow is not None and allow.names(addr):
                return Decision(True, allow.label)
            return Decision(
                False, f"never: {address_kind(addr)} address {addr} (needs a CIDR rule)"
            )
        if by_name is not None:
            return by_name
        if allow is not None:
            return Decision(True, allow.label)
        return Decision(False, f"never: IP literal {addr} (needs a CIDR rule)")


def address_kind(addr: IPAddress) -> str:
    if addr.is_loopback:
        return "loopback"
    if str(addr) in ("169.254.169.254", "fd00:ec2::254"):
        return "metadata"
    if addr.is_link_local:
        return "link-local"
    if addr.is_private:
        return "private"
    return "non-public"


# --- storage ----------------------------------------------------------------------


def rules_file() -> Path:
    return paths.policy_rules()


def load_rules(path: Path | None = None) -> list[Rule]:
    """Every stored rule, or ConfigError naming the file when any entry is bad."""
    path = path or rules_file()
    if not path.exists():
        return []
    try:
        data = read_json(path, {"version": int, "rules": list})
    except StateError as e:
        raise ConfigError(str(e), f"fix or remove {path}") from None
    out = []
    for i, entry in enumerate(data["rules"]):
        if not isinstance(entry, dict) or set(entry) - {"action", "target", "for"}:
            raise ConfigError(f"{path}: rule {i} is malformed", f"fix or remove {path}")
        scope = entry.get("for")
        if scope is not None:
            paths.check_name(str(scope), "--for name")
        try:
            out.append(parse_rule(str(entry.get("action")), str(entry.get("target")), scope))
        except ConfigError as e:
            raise ConfigError(f"{path}: rule {i}: {e.message}", f"fix or remove {path}") from None
    return out


def save_rules(rules: list[Rule], path: Path | None = None) -> None:
    entries = [{"action": r.action, "target": r.target, "for": r.scope} for r in rules]
    write_json(path or rules_file(), {"version": 1, "rules": entries})


def add_rule(rule: Rule) -> bool:
    """Store `rule` (replacing the same target's rule in the same scope); False if present."""
    rules = load_rules()
    if rule in rules:
        return False
    rules = [r for r in rules if (r.target, r.scope) != (rule.target, rule.scope)]
    save_rules([*rules, rule])
    return True


def remove_rule(target: str, scope: str | None) -> Rule:
    """Remove the rule for `target` in `scope`; ConfigError when there is none."""
    wanted = parse_rule("allow", target, scope).target
    rules = load_rules()
    gone = [r for r in rules if (r.target, r.scope) == (wanted, scope)]
    if not gone:
        where = f"for {scope}" if scope else "global"
        raise ConfigError(f"no {where} rule for {wanted}", "see `vmctl policy ls`")
    save_rules([r for r in rules if r not in gone])
    return gone[0]


def policy_for(who: str, preset_name: str) -> Policy:
    """The policy in effect for `who` right now (read per connection by the proxy)."""
    rules = tuple(r for r in load_rules() if r.scope in (None, who))
    return Policy(preset(preset_name), rules)


def parse_resolve(value: str) -> tuple[str, str]:
    """`--resolve HOST:ADDR` (as curl's, without the port) -> (host, address)."""
    host, sep, addr = value.partition(":")
    ip = _ip(addr.strip("[]")) if sep else None
    if ip is None:
        raise ConfigError(f"--resolve {value!r} is not HOST:ADDR", "e.g. pkg.test:127.0.0.1")
    return check_host(host, value), str(ip)


def resolve_map(values: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in values:
        host, addr = parse_resolve(v)
        out.setdefault(host, []).append(addr)
    return out


def describe(rules: list[Rule]) -> list[dict[str, Any]]:
    return [
        {"action": r.action, "target": r.target, "for": r.scope, "label": r.label} for r in rules
    ]
