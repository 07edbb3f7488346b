"""Where forge keeps its files (FORGE_HOME) and what config.toml may say.

Every key is declared in `KEYS` with its type, default and range; config.toml and
`forge config set` are checked against it, and `FORGE_<SECTION>_<NAME>` in the environment overrides a key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge_cli.errors import ConfigError, StorageError

INT_MAX = 2**53  # the largest amount or count a key or a CLI argument takes (exact in JSON)
TOKENS_MAX = 2**20  # n_ctx and max_tokens
DAY_S = 86_400


@dataclass(frozen=True)
class Key:
    """One config key: its type, default and meaning, and the values it may take.

    Integers take `low`..`high` (both required); strings take `choices` when given, and are
    otherwise non-empty when `required`; lists hold non-empty strings.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    low: int | None = None
    high: int | None = None
    required: bool = False

    @property
    def env(self) -> str:
        return "FORGE_" + self.name.upper().replace(".", "_")

    @property
    def range(self) -> str:
        """The values this key takes, in words: `0 to 65535`, `full|normal`, `non-empty`."""
        if self.type is int:
            return f"{self.low} to {self.high}"
        if self.choices:
            return "|".join(self.choices)
        if self.type is bool:
            return "true|false"
        if self.type is list:
            return "non-empty strings"
        return "non-empty" if self.required else "any"


KEYS: dict[str, Key] = {
    k.name: k
    for k in [
        Key("ledger.path", str, "", "ledger file; empty means FORGE_HOME/ledger.db"),
        Key(
            "ledger.synchronous",
            str,
            "full",
            "full: fsync every commit; normal: fsync at checkpoints (faster, may lose the tail "
            "on power loss, never on a crash of the process)",
            ("full", "normal"),
        ),
        Key("models.dir", str, "", "GGUF download folder; empty means the Hugging Face cache"),
        Key("models.default", str, "smollm2:135m", "model used when -m is not given",
            required=True),
        Key("models.catalog", str, "", "TOML file of further catalog entries ([[model]] tables); "
            "empty means the built-in catalog only"),
        Key("models.n_ctx", int, 4096, "context window of each request, in tokens",
            low=256, high=TOKENS_MAX),
        Key("engine.threads", int, 0,
            "threads llama.cpp generates with (0: one per physical core)", low=0, high=1024),
        Key("engine.threads_batch", int, 0,
            "threads for prompt chunks and steps over several sequences (0: engine.threads)",
            low=0, high=1024),
        Key("engine.slots", int, 0,
            "requests a node decodes together (spread over engine.lanes), each with a context of "
            "models.n_ctx (0: 4 on a CPU, 8 with GPU offload; 1: one at a time)",
            low=0, high=256),
        Key("engine.lanes", int, 1,
            "contexts the slots are spread over, each stepped on its own thread (on a CPU, up "
            "to one per physical core; measure with bench/engine_bench.py)", low=1, high=256),
        Key("chat.max_tokens", int, 512, "default --max-tokens of forge chat", low=1, high=TOKENS_MAX),
        Key("chat.temperature_milli", int, 700, "default temperature of forge chat, in 1/1000",
            low=0, high=2000),
        Key("node.host", str, "127.0.0.1", "address forge node binds to", required=True),
        Key("node.port", int, 3001, "port forge node listens on (0: a free one)", low=0,
            high=65535),
        Key("node.queue", int, 16, "requests that may wait for a model before 429 Busy", low=1,
            high=10_000),
        Key("node.url", str, "", "node that `forge chat --node` buys from by default"),
        Key("mesh.interfaces", list, ["127.0.0.1"], "addresses zeroconf binds to"),
        Key("mesh.mdns", bool, True,
            "advertise and browse with mDNS (false: static peers only, for networks that "
            "block multicast)"),
        Key("mesh.peers", list, [], "node URLs probed as peers without mDNS (static peers)"),
        Key("mesh.probe_s", int, 5, "seconds between /health probes of each peer", low=1,
            high=3600),
        Key("mesh.expire_s", int, 30, "seconds a peer may go unanswered before it is dropped",
            low=1, high=DAY_S),
        Key("mesh.settle_s", int, 30,
            "seconds a peer consumer has to countersign served terms before they are recorded "
            "as unsettled", low=1, high=DAY_S),
        Key("mesh.max_unsettled", int, 3,
            "sales a peer consumer may leave uncountersigned (served and waiting, or recorded "
            "unsettled) before this node sells it nothing more", low=1, high=1000),
        Key("mesh.strangers", int, 50,
            "peer accounts that may live on this node's free tier at once (against Sybil floods)",
            low=0, high=1_000_000),
        Key("mesh.stranger_idle_s", int, 3600,
            "seconds after which an untouched peer free-tier grant is returned (a `burn` entry), "
            "freeing its slot", low=1, high=30 * DAY_S),
        Key("mesh.gossip_s", int, 10,
            "seconds between gossip rounds: pull from each peer and check its checkpoint "
            "(new trades are pushed at once)", low=1, high=3600),
        Key("mesh.gossip_batch", int, 200, "trades per gossip push or pull page", low=1,
            high=500),
        Key("mesh.gossip_source_quota", int, 5000,
            "foreign trades one address may add to the network view per hour, pushed or pulled",
            low=1, high=INT_MAX),
        Key("mesh.trust_s", int, 10,
            "seconds between recomputations of trust over the network view (each walks every "
            "trade the view holds; reads between them see the last one)", low=1, high=3600),
        Key("mesh.gossip_max_trades", int, 200_000,
            "foreign trades the network view keeps at most (about 2 kB each on disk)",
            low=1, high=INT_MAX),
        Key("audit.every", int, 20,
            "audit one purchase in N of a model this node holds (1: every purchase)",
            low=1, high=1_000_000),
        Key("audit.rechecks_per_minute", int, 2,
            "peers' disputes one auditor may have re-checked here per minute (re-checks run "
            "one at a time, only while no paying work is)", low=1, high=10_000),
        Key("audit.recheck_queue", int, 8,
            "peers' disputes that may wait for a re-check at once before 429", low=1,
            high=1_000),
        Key("rpc.port", int, 3002, "port `forge rpc serve` tunnels layer work on (0: a free one)",
            low=0, high=65535),
        Key("rpc.rate_ucu", int, 20_000,
            "what a layer peer charges the head per layer per token its layers run (prompt and "
            "generated), in µCU",
            low=0, high=INT_MAX),
        Key("rpc.memory_mb", int, 0,
            "memory a layer peer offers, in MiB (0: what the machine has available)",
            low=0, high=INT_MAX),
        Key("rpc.terms_s", int, 3600, "seconds a layer peer's signed terms stay valid",
            low=1, high=30 * DAY_S),
        Key("rpc.credit_kib", int, 64 * 1024,
            "tunnel KiB a layer peer carries for a head under one agreement before it is paid "
            "(the most it gives away per agreement)", low=16, high=INT_MAX // 1024),
        Key("rpc.layer_token_kib", int, 1024,
            "tunnel KiB each layer-token a head pays a layer peer for buys (the weights are "
            "paid as tunnel bytes)", low=1, high=INT_MAX // 1024),
        Key("rpc.idle_s", int, 60,
            "seconds a layer peer keeps a tunnel that carries nothing (so no head holds it idle)",
            low=1, high=DAY_S),
        Key("rpc.discover_s", int, 5,
            "seconds `forge node --split auto` looks for layer peers on the mesh", low=1,
            high=3600),
        Key("rpc.stall_s", int, 120,
            "seconds a split model may go without a token before the head fails the request "
            "and blames the peer it waits on", low=1, high=DAY_S),
        Key("safety.per_request_cap_cu", int, 5_000,
            "default largest single spend, in CU (a `policy` entry overrides it per account)",
            low=1, high=INT_MAX),
        Key("safety.hourly_budget_cu", int, 20_000, "default CU an account may spend per hour",
            low=1, high=INT_MAX),
        Key("safety.lifetime_budget_cu", int, 200_000, "default CU an account may ever spend",
            low=1, high=INT_MAX),
        Key("safety.approval_threshold_cu", int, 2_000,
            "default spend above which a person must approve (keep it below the cap)",
            low=1, high=INT_MAX),
        Key("safety.approval_ttl_s", int, 900, "seconds an approval request waits for a person",
            low=1, high=7 * DAY_S),
        Key("safety.breaker_errors", int, 5, "consecutive failed requests that open the breaker",
            low=1, high=1_000_000),
        Key("safety.breaker_spends_per_minute", int, 30,
            "spends in one minute above which the breaker opens", low=1, high=1_000_000),
        Key("safety.breaker_reset_s", int, 300, "seconds after which an open breaker closes",
            low=1, high=DAY_S),
        Key("agents.roster", str, "", "TOML file of agent lanes ([[agent]] tables); empty "
            "means the built-in roster"),
        Key("agents.budget_cu", int, 4_000, "CU an agent run may spend unless --budget says "
            "(0: no budget)", low=0, high=INT_MAX),
        Key("agents.max_seconds", int, 0, "seconds an agent run may take unless --max-seconds "
            "says (0: no limit)", low=0, high=DAY_S),
        Key("agents.route_threshold_pm", int, 500, "keyword score (permille) a lane needs to "
            "win the lexical route", low=0, high=1000),
        Key("agents.route_margin_pm", int, 150, "lead (permille) the winning lane needs over "
            "the next; else the classifier decides", low=0, high=1000),
        Key("agents.tier_cheap", list, [], "models for cheap lanes; empty means the run's model"),
        Key("agents.tier_capable", list, [], "models a failed cheap task escalates to "
            "(catalog or mesh names; base models are skipped)"),
        Key("agents.tier_frontier", list, [], "models a failed capable task escalates to"),
        Key("agents.judge", bool, True, "a model judge checks each result that passes the "
            "deterministic checks"),
        Key("agents.intent_judge", bool, False, "a model judgment when the answer's intent "
            "coverage is flagged"),
        Key("agents.verifier", list, [], "argv of a command that verifies each answer (the "
            "answer is its last argument; exit 0 is ok)"),
        Key("agents.categories", list, [], "lane categories agent runs may use; empty means all"),
        Key("lending.sweep_s", int, 30, "seconds between the node's checks for overdue loans",
            low=1, high=DAY_S),
        Key("lending.heartbeat_s", int, 3600,
            "seconds between the node's heartbeat entries (the uptime part of credit)",
            low=1, high=DAY_S),
    ]
}


def home() -> Path:
    """FORGE_HOME, or ~/.forge."""
    return Path(os.environ.get("FORGE_HOME") or Path.home() / ".forge").expanduser()


def ensure_home() -> Path:
    path = home()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create FORGE_HOME {path}: {exc.strerror}") from exc
    return path


def config_path() -> Path:
    return home() / "config.toml"


def _key(name: str) -> Key:
    try:
        return KEYS[name]
    except KeyError:
        known = ", ".join(sorted(KEYS))
        raise ConfigError(f"unknown config key {name!r}; known keys: {known}") from None


def _typename(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "true or false", list: "a list"}[kind]


def check_value(name: str, value: Any) -> Any:
    """The value if it fits the key's type and choices; ConfigError naming the key otherwise."""
    key = _key(name)
    ok = type(value) is key.type or (key.type is list and isinstance(value, list))
    if not ok:
        raise ConfigError(
            f"config key {name!r} must be {_typename(key.type)}, "
            f"found {type(value).__name__} {value!r}"
        )
    if key.choices and value not in key.choices:
        raise ConfigError(f"config key {name!r} must be one of {', '.join(key.choices)}; "
                          f"found {value!r}")
    if key.type is int and not key.low <= value <= key.high:
        raise ConfigError(f"config key {name!r} must be between {key.low} and {key.high}, "
                          f"found {value}")
    if key.type is str and key.required and not value.strip():
        raise ConfigError(f"config key {name!r} must not be empty")
    if key.type is list and not all(isinstance(item, str) and item.strip() for item in value):
        raise ConfigError(f"config key {name!r} must be a list of non-empty strings, "
                          f"found {value!r}")
    return value


def parse_text(name: str, text: str) -> Any:
    """Turn a command-line or environment string into the key's type."""
    key = _key(name)
    if key.type is int:
        try:
            value: Any = int(text, 10)
        except ValueError:
            raise ConfigError(f"config key {name!r} must be an integer, found {text!r}") from None
    elif key.type is bool:
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"config key {name!r} must be true or false, found {text!r}")
        value = lowered in ("true", "1", "yes")
    elif key.type is list:
        value = [part.strip() for part in text.split(",") if part.strip()]
    else:
        value = text
    return check_value(name, value)


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in table.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def read_file(path: Path | None = None) -> dict[str, Any]:
    """The keys set in config.toml (flattened, validated); {} when there is no file."""
    import tomllib  # here: `forge --help` reads no config

    path = path or config_path()
    try:
        with path.open("rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
    flat = _flatten(table)
    for name, value in flat.items():
        try:
            check_value(name, value)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return flat


def load() -> dict[str, Any]:
    """Every key's effective value: default < config.toml < FORGE_* environment."""
    values = {name: key.default for name, key in KEYS.items()}
    values.update(read_file())
    for name, key in KEYS.items():
        raw = os.environ.get(key.env)
        if raw is not None:
            try:
                values[name] = parse_text(name, raw)
            except ConfigError as exc:
                raise ConfigError(f"{key.env}: {exc}") from None
    return values


def get(name: str) -> Any:
    _key(name)
    return load()[name]


def set_value(name: str, text: str) -> Any:
    """Validate and write one key to config.toml atomically; returns the typed value."""
    import tomli_w

    value = parse_text(name, text)
    flat = read_file()
    flat[name] = value
    nested: dict[str, Any] = {}
    for dotted, item in sorted(flat.items()):
        *sections, leaf = dotted.split(".")
        table = nested
        for section in sections:
            table = table.setdefault(section, {})
        table[leaf] = item
    path = config_path()
    ensure_home()
    tmp = path.with_suffix(".toml.tmp")
    try:
        with tmp.open("wb") as fh:
            tomli_w.dump(nested, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc
    return value


def ledger_path(override: str | os.PathLike[str] | None = None) -> Path:
    """--ledger PATH, else ledger.path, else FORGE_HOME/ledger.db."""
    if override:
        return Path(override).expanduser()
    configured = get("ledger.path")
    return Path(configured).expanduser() if configured else home() / "ledger.db"
