"""E2EE benchmark: meshchat's wire bytes, message throughput and rekey cost against naive designs.

Usage::

    .venv/bin/python benchmarks/e2ee_bench.py [--quick] [--json PATH]

Three tables, each with the DESIGN.md section 8 budget, a pass/fail mark and a ratio against a
reference measured in the same run:

1. bytes per message (20 / 100 / 1000-byte texts) of the signed meshchat envelope, beside a naive
   JSON envelope (base64 ciphertext and signature) and OwnTracks' encrypted JSON (SecretBox, no
   signature), and the whole MQTT 3.1.1 PUBLISH of the 20-byte text;
2. encrypt+sign and verify+decrypt messages per second of CPU on one core, 100-byte texts, beside
   the naive JSON envelope with the same crypto;
3. rekey CPU time and bytes per recipient for 10 / 100 / 1000 devices, beside a SealedBox and an
   Ed25519 signature per recipient.

Everything is sans-IO and single-threaded: CPU time is `time.process_time`, every loop has a count
and a time limit, and the table shows the median of the repetitions (the JSON has them all). See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import hashlib
import json
import os
import platform
import secrets
import statistics
import string
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self, TypeAlias

import msgpack
import nacl.bindings
import nacl.public
import nacl.secret
import nacl.signing
from rich.console import Console
from rich.table import Table

from meshchat.e2ee import (
    BoxKeyPair,
    ChainShare,
    InboundChain,
    Inner,
    InnerCodec,
    Kind,
    OutboundChain,
    SigningKeyPair,
    decode_inner,
    encode_inner,
    open_distribution,
    seal_distribution,
    verify,
)
from meshchat.envelope import SIG_LEN, Distribution, GroupMessage, Sealed, decode, encode

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    Sender: TypeAlias = Callable[[str], bytes]
    Reader: TypeAlias = Callable[[bytes], str]

DEFAULT_JSON: Final = Path(__file__).resolve().parent / "results" / "e2ee.json"
TOPIC: Final = "mc/acme/ops/night-shift"
"""The group every message is sent to (its topic is 23 bytes)."""
SENDER: Final = "alice-phone"
"""The sending device: its name travels in distributions and in the naive JSON envelope."""
TEXT_SIZES: Final = (20, 100, 1000)
ENVELOPE_BUDGET: Final = {20: 125, 100: 205, 1000: 1107}
"""Bytes of the signed meshchat envelope per text size (issue 4; DESIGN.md section 8 for 20)."""
PUBLISH_TEXT: Final = 20
PUBLISH_BUDGET: Final = 165
THROUGHPUT_TEXT: Final = 100
DECRYPT_BUDGET: Final = 10_000
"""verify+decrypt messages per second of one core."""
RECIPIENT_COUNTS: Final = (10, 100, 1000)
REKEY_BUDGET_AT: Final = 1000
REKEY_MS_BUDGET: Final = 60.0
REKEY_BYTES_BUDGET: Final = 230

VERIFY_STEP: Final = "verify"
VERIFY_FORMAT: Final = "ed25519"
_SIGNED_LEN: Final = 180
"""About the bytes a 100-byte text's chain signature covers (domain, group id, signed part)."""

_NAIVE_PERSON: Final = b"naive-chain1"
_DIST_DOMAIN: Final = b"mc-dist1"
_KEY_LEN: Final = 32
_NONCE_LEN: Final = 24


@dataclass(frozen=True, slots=True)
class Params:
    """Counts and limits of one run."""

    messages: int = 1000
    """Messages per throughput repetition: one chain's whole life (it rotates at 1000)."""
    throughput_reps: int = 15
    rekey_reps: tuple[int, ...] = (101, 41, 15)
    """Repetitions of a rekey, per entry of `RECIPIENT_COUNTS`."""
    limit_s: float = 8.0
    """No new repetition of one measurement starts after this many seconds (at least one runs)."""


QUICK: Final = Params(messages=300, throughput_reps=3, rekey_reps=(11, 5, 3), limit_s=1.5)


@dataclass(slots=True)
class Series:
    """Repeated measurements of one number; the table shows the median."""

    runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        """The median run."""
        return statistics.median(self.runs)


# Keyed by row then format; by step then format; by recipient count, metric, then method.
Sizes: TypeAlias = dict[str, dict[str, int]]
Throughput: TypeAlias = dict[str, dict[str, Series]]
Rekey: TypeAlias = dict[str, dict[str, dict[str, Series]]]


# --- wire formats --------------------------------------------------------------------------------


def random_text(length: int) -> str:
    """Random lowercase letters: incompressible enough that no codec flatters a format."""
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(length))


def mqtt_publish_len(topic: str, payload_len: int, *, qos: int = 1) -> int:
    """Bytes of a whole MQTT 3.1.1 PUBLISH packet: fixed header, variable header, payload."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + payload_len
    length_bytes = 1
    while remaining >= 128**length_bytes:
        length_bytes += 1
    return 1 + length_bytes + remaining


def meshchat_send(chain: OutboundChain, text: str, ts: int) -> bytes:
    """A text as a client sends it: inner plaintext, encrypt and sign, encode."""
    inner = encode_inner(Inner(Kind.TEXT, ts, (text,)), codec=InnerCodec.PLAIN)
    return encode(chain.encrypt(TOPIC, inner))


def meshchat_read(chain: InboundChain, wire: bytes) -> str:
    """A text as a client reads it: decode, verify and decrypt, inner plaintext."""
    envelope = decode(wire)
    if not isinstance(envelope, GroupMessage):
        raise TypeError("not a group message")
    text = decode_inner(chain.decrypt(TOPIC, envelope)).fields[0]
    assert isinstance(text, str)  # a TEXT message's only field is a str
    return text


def _ratchet(chain_key: bytes) -> tuple[bytes, bytes, bytes]:
    """(message key, nonce, next chain key): the same BLAKE2b ratchet as meshchat's chains."""
    keys = hashlib.blake2b(
        b"\x01", key=chain_key, digest_size=_KEY_LEN + _NONCE_LEN, person=_NAIVE_PERSON
    ).digest()
    next_key = hashlib.blake2b(
        b"\x02", key=chain_key, digest_size=_KEY_LEN, person=_NAIVE_PERSON
    ).digest()
    return keys[:_KEY_LEN], keys[_KEY_LEN:], next_key


@dataclass(slots=True)
class NaiveSender:
    """The reference: the same ratchet and primitives, in a JSON envelope as a typical app has it.

    The nonce comes from the ratchet, as in meshchat, so it is not on the wire: that spares the
    reference 32 bytes of base64 a typical app would send, and keeps its ratios conservative.
    """

    chain_id: int
    chain_key: bytes = field(repr=False)
    signing_key: nacl.signing.SigningKey = field(repr=False)
    index: int = 0

    @classmethod
    def new(cls) -> Self:
        """A fresh chain."""
        return cls(
            secrets.randbelow(2**32 - 1) + 1,
            secrets.token_bytes(_KEY_LEN),
            nacl.signing.SigningKey.generate(),
        )

    def send(self, text: str, ts: int) -> bytes:
        """Encrypt, sign the JSON of every other field, and add the signature."""
        key, nonce, self.chain_key = _ratchet(self.chain_key)
        ciphertext = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            text.encode("utf-8"), None, nonce, key
        )
        message: dict[str, object] = {
            "sender": SENDER,
            "group": TOPIC,
            "chain_id": self.chain_id,
            "index": self.index,
            "ts": ts,
            "ciphertext": base64.b64encode(ciphertext).decode("ascii"),
        }
        signed = json.dumps(message, sort_keys=True).encode("utf-8")
        message["signature"] = base64.b64encode(self.signing_key.sign(signed).signature).decode(
            "ascii"
        )
        self.index += 1
        return json.dumps(message).encode("utf-8")


@dataclass(slots=True)
class NaiveReceiver:
    """The receiving side of `NaiveSender`: parse, verify, then decrypt, in order."""

    chain_key: bytes = field(repr=False)
    verify_key: nacl.signing.VerifyKey

    def read(self, wire: bytes) -> str:
        """Parse the JSON, check the signature over the other fields, decrypt."""
        message = json.loads(wire)
        signature = base64.b64decode(message.pop("signature"), validate=True)
        self.verify_key.verify(json.dumps(message, sort_keys=True).encode("utf-8"), signature)
        key, nonce, self.chain_key = _ratchet(self.chain_key)
        ciphertext = base64.b64decode(message["ciphertext"], validate=True)
        plaintext: bytes = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ciphertext, None, nonce, key
        )
        return plaintext.decode("utf-8")


def owntracks_message(box: nacl.secret.SecretBox, text: str, ts: int) -> bytes:
    """OwnTracks' encrypted payload: libsodium secretbox (random nonce first), no signature."""
    inner = json.dumps({"_type": "msg", "text": text, "tst": ts}, separators=(",", ":"))
    data = base64.b64encode(box.encrypt(inner.encode("utf-8"))).decode("ascii")
    return json.dumps({"_type": "encrypted", "data": data}, separators=(",", ":")).encode("utf-8")


def naive_seal(
    *,
    device_key: SigningKeyPair,
    share: ChainShare,
    recipients: Mapping[str, bytes],
) -> dict[str, Sealed]:
    """The plain reading of DESIGN.md section 5: a SealedBox and a signature per recipient.

    It is meshchat's own pairwise pattern: the payload names sender and recipient inside the box,
    and the `Sealed` envelope's signature covers the sender and the box.
    """
    copies: dict[str, Sealed] = {}
    for name, public in recipients.items():
        payload: bytes = msgpack.packb(
            [SENDER, name, TOPIC, share.chain_id, share.index, share.chain_key, share.verify_key],
            use_bin_type=True,
        )
        sealed = bytes(nacl.public.SealedBox(nacl.public.PublicKey(public)).encrypt(payload))
        unsigned = Sealed(SENDER, sealed, bytes(SIG_LEN))
        copies[name] = Sealed(SENDER, sealed, device_key.sign(_DIST_DOMAIN, unsigned.signed_part()))
    return copies


# --- measurements --------------------------------------------------------------------------------


def measure_sizes(ts: int) -> Sizes:
    """Bytes of each format per text size, and of the whole PUBLISH of the shortest text.

    Every meshchat message is the first of a fresh chain (index 0) and is read back, so the bytes
    counted are a message a member can read.
    """
    sizes: Sizes = {}
    box = nacl.secret.SecretBox(secrets.token_bytes(nacl.secret.SecretBox.KEY_SIZE))
    for length in TEXT_SIZES:
        text = random_text(length)
        send, read = _meshchat_pair(ts)
        wire = send(text)
        if read(wire) != text:
            raise RuntimeError("a meshchat message did not read back")
        sizes[f"text_{length}"] = {
            "meshchat": len(wire),
            "naive_json": len(NaiveSender.new().send(text, ts)),
            "owntracks": len(owntracks_message(box, text, ts)),
        }
    short = sizes[f"text_{PUBLISH_TEXT}"]
    sizes[f"publish_{PUBLISH_TEXT}"] = {
        name: mqtt_publish_len(TOPIC, payload) for name, payload in short.items()
    }
    return sizes


def _meshchat_pair(ts: int) -> tuple[Sender, Reader]:
    """A fresh chain and a member who got its share before the first message."""
    chain = OutboundChain.new(now=ts)
    reader = InboundChain.from_share(chain.share(), sender=SENDER)
    return (lambda text: meshchat_send(chain, text, ts)), (lambda wire: meshchat_read(reader, wire))


def _naive_pair(ts: int) -> tuple[Sender, Reader]:
    sender = NaiveSender.new()
    reader = NaiveReceiver(sender.chain_key, sender.signing_key.verify_key)
    return (lambda text: sender.send(text, ts)), reader.read


def _rates(pair: tuple[Sender, Reader], texts: Sequence[str]) -> tuple[float, float]:
    """(sent per CPU second, read per CPU second) of `texts` through one chain."""
    send, read = pair
    gc.collect()
    started = time.process_time()
    wires = [send(text) for text in texts]
    sent = time.process_time() - started
    gc.collect()
    started = time.process_time()
    got = [read(wire) for wire in wires]
    received = time.process_time() - started
    if got != list(texts):
        raise RuntimeError("a message did not read back")
    return len(texts) / sent, len(texts) / received


def _verify_rate(count: int) -> float:
    """Ed25519 verifications per CPU second (libsodium): the floor under every signed read."""
    key = nacl.signing.SigningKey.generate()
    messages = [secrets.token_bytes(_SIGNED_LEN) for _ in range(count)]
    signed = [key.sign(message) for message in messages]
    verify_key = key.verify_key
    gc.collect()
    started = time.process_time()
    for item in signed:
        verify_key.verify(item)
    return count / (time.process_time() - started)


def measure_throughput(params: Params, ts: int) -> Throughput:
    """Messages per CPU second, meshchat and the naive JSON envelope alternating run by run.

    Each repetition also times Ed25519 verification alone, the floor of any signed read, so a
    table from a slow moment of a shared machine says so in its own "verify alone" row.
    """
    texts = [random_text(THROUGHPUT_TEXT) for _ in range(params.messages)]
    makers = {"meshchat": _meshchat_pair, "naive_json": _naive_pair}
    for make in makers.values():  # warm-up: first calls, allocator, caches
        _rates(make(ts), texts[:50])
    series = {step: {name: Series() for name in makers} for step in ("encrypt", "decrypt")}
    series[VERIFY_STEP] = {VERIFY_FORMAT: Series()}
    started = time.monotonic()
    for _ in range(params.throughput_reps):
        for name, make in makers.items():
            encrypt, decrypt = _rates(make(ts), texts)
            series["encrypt"][name].runs.append(encrypt)
            series["decrypt"][name].runs.append(decrypt)
        series[VERIFY_STEP][VERIFY_FORMAT].runs.append(_verify_rate(params.messages))
        if time.monotonic() - started > params.limit_s:
            break
    return series


def _seal(
    seal: Callable[..., Mapping[str, Distribution | Sealed]], share: ChainShare
) -> tuple[float, float]:
    """(CPU milliseconds of one rekey, mean encoded bytes per recipient copy)."""
    gc.collect()
    started = time.process_time()
    copies = seal(share=share)
    elapsed = time.process_time() - started
    return elapsed * 1000, statistics.fmean(len(encode(copy)) for copy in copies.values())


def measure_rekey(params: Params, ts: int) -> Rekey:
    """Rekey CPU and bytes per recipient, meshchat and the naive seal alternating run by run."""
    device_key = SigningKeyPair.generate()
    boxes = {f"dev-{n:04d}": BoxKeyPair.generate() for n in range(max(RECIPIENT_COUNTS))}
    results: Rekey = {}
    for count, reps in zip(RECIPIENT_COUNTS, params.rekey_reps, strict=True):
        recipients = {name: box.public for name, box in list(boxes.items())[:count]}
        seals: dict[str, Callable[..., Mapping[str, Distribution | Sealed]]] = {
            "meshchat": partial(
                seal_distribution,
                sender=SENDER,
                device_key=device_key,
                group_topic=TOPIC,
                recipients=recipients,
            ),
            "naive": partial(naive_seal, device_key=device_key, recipients=recipients),
        }
        cpu = {name: Series() for name in seals}
        size = {name: Series() for name in seals}
        started = time.monotonic()
        for _ in range(reps):
            for name, seal in seals.items():
                ms, per_copy = _seal(seal, OutboundChain.new(now=ts).share())
                cpu[name].runs.append(ms)
                size[name].runs.append(per_copy)
            if time.monotonic() - started > params.limit_s:
                break
        _check_rekey(device_key, boxes, recipients, ts)
        results[str(count)] = {"cpu_ms": cpu, "bytes": size}
    return results


def _check_rekey(
    device_key: SigningKeyPair,
    boxes: Mapping[str, BoxKeyPair],
    recipients: Mapping[str, bytes],
    ts: int,
) -> None:
    """Both rekeys hand the last recipient the chain key: the benchmark counts working copies."""
    share = OutboundChain.new(now=ts).share()
    name = list(recipients)[-1]
    sealed = seal_distribution(
        sender=SENDER, device_key=device_key, group_topic=TOPIC, share=share, recipients=recipients
    )[name]
    decoded = decode(encode(sealed))
    assert isinstance(decoded, Distribution)
    opened = open_distribution(
        decoded, org="acme", recipient=name, box_key=boxes[name], sender_key=device_key.public
    )
    naive = naive_seal(device_key=device_key, share=share, recipients=recipients)[name]
    payload = nacl.public.SealedBox(nacl.public.PrivateKey(boxes[name].secret)).decrypt(
        naive.sealed
    )
    if (
        opened.share != share
        or not verify(device_key.public, _DIST_DOMAIN, naive.signed_part(), naive.sig)
        or msgpack.unpackb(payload)[5] != share.chain_key
    ):
        raise RuntimeError("a rekey copy does not open to the chain key")


# --- budgets, tables, JSON -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """One budget of DESIGN.md section 8 and the measured value."""

    key: str
    value: float
    limit: float
    at_most: bool = True
    """True: the value must not exceed the limit; False: it must reach it."""

    @property
    def passed(self) -> bool:
        """Whether the value is within budget."""
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    @property
    def budget(self) -> str:
        """The budget as the table shows it."""
        return f"{'≤' if self.at_most else '≥'} {self.limit:,g}"

    @property
    def miss(self) -> str:
        """How far outside the budget the value is, for the summary."""
        over = self.value - self.limit if self.at_most else self.limit - self.value
        return f"{over:,.1f} ({over / self.limit:.1%}) {'over' if self.at_most else 'short'}"


def checks(sizes: Sizes, throughput: Throughput, rekey: Rekey) -> dict[str, Check]:
    """Every budget this benchmark measures, by the key of its table row."""
    at = rekey[str(REKEY_BUDGET_AT)]
    found = [
        *(
            Check(f"text_{n}", sizes[f"text_{n}"]["meshchat"], ENVELOPE_BUDGET[n])
            for n in TEXT_SIZES
        ),
        Check(
            f"publish_{PUBLISH_TEXT}", sizes[f"publish_{PUBLISH_TEXT}"]["meshchat"], PUBLISH_BUDGET
        ),
        Check("decrypt", throughput["decrypt"]["meshchat"].median, DECRYPT_BUDGET, at_most=False),
        Check(f"rekey_{REKEY_BUDGET_AT}_cpu_ms", at["cpu_ms"]["meshchat"].median, REKEY_MS_BUDGET),
        Check(f"rekey_{REKEY_BUDGET_AT}_bytes", at["bytes"]["meshchat"].median, REKEY_BYTES_BUDGET),
    ]
    return {check.key: check for check in found}


def _budget_cells(check: Check | None) -> list[str]:
    if check is None:
        return ["—", ""]
    mark = "[green]✓ pass[/green]" if check.passed else "[red]✗ FAIL[/red]"
    return [check.budget, mark]


def _ratio(mine: float, reference: float) -> str:
    return f"{mine / reference:.2f}x" if reference else "—"


def _table(title: str, columns: Sequence[str]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for column in columns:
        table.add_column(column, justify="right")
    return table


def size_table(sizes: Sizes, budget: Mapping[str, Check]) -> Table:
    """Table 1: bytes per message, meshchat beside the naive JSON envelope and OwnTracks."""
    table = _table(
        f"1. bytes per message (signed, topic {TOPIC})",
        [
            "meshchat",
            "budget",
            "",
            "naive JSON",
            "ratio mc/JSON",
            "OwnTracks",
            "ratio mc/OwnTracks",
        ],
    )
    rows = [(f"text_{n}", f"envelope, {n}-byte text (B)") for n in TEXT_SIZES]
    rows.append((f"publish_{PUBLISH_TEXT}", f"whole PUBLISH QoS 1, {PUBLISH_TEXT}-byte text (B)"))
    for key, label in rows:
        if key.startswith("publish"):
            table.add_section()
        row = sizes[key]
        table.add_row(
            label,
            f"{row['meshchat']:,}",
            *_budget_cells(budget.get(key)),
            f"{row['naive_json']:,}",
            _ratio(row["meshchat"], row["naive_json"]),
            f"{row['owntracks']:,}",
            _ratio(row["meshchat"], row["owntracks"]),
        )
    return table


def throughput_table(throughput: Throughput, budget: Mapping[str, Check]) -> Table:
    """Table 2: messages per CPU second on one core, meshchat beside the naive JSON envelope."""
    table = _table(
        f"2. throughput, {THROUGHPUT_TEXT}-byte texts, one core (msg per CPU second, median)",
        ["meshchat", "µs/msg", "budget", "", "naive JSON", "µs/msg", "ratio mc/JSON"],
    )
    labels = {
        "encrypt": "encode inner + encrypt+sign + encode (msg/s)",
        "decrypt": "decode + verify+decrypt + decode inner (msg/s)",
    }
    for step, label in labels.items():
        mine, naive = throughput[step]["meshchat"].median, throughput[step]["naive_json"].median
        table.add_row(
            label,
            f"{mine:,.0f}",
            f"{1e6 / mine:.1f}",
            *_budget_cells(budget.get(step)),
            f"{naive:,.0f}",
            f"{1e6 / naive:.1f}",
            _ratio(mine, naive),
        )
    floor = throughput[VERIFY_STEP][VERIFY_FORMAT].median
    table.add_section()
    table.add_row(
        "Ed25519 verify alone: the floor of both (verifications/s)",
        f"{floor:,.0f}",
        f"{1e6 / floor:.1f}",
        "",
        "",
        f"{floor:,.0f}",
        f"{1e6 / floor:.1f}",
        "",
    )
    return table


def rekey_table(rekey: Rekey, budget: Mapping[str, Check]) -> Table:
    """Table 3: the cost of handing a new chain to N devices, beside a SealedBox each."""
    table = _table(
        "3. rekey: seal one chain for N recipient devices (median)",
        ["meshchat", "budget", "", "naive: SealedBox + sig each", "ratio mc/naive"],
    )
    for metric, label, digits in (("cpu_ms", "CPU (ms)", 2), ("bytes", "bytes per recipient", 1)):
        if metric == "bytes":
            table.add_section()
        for count in RECIPIENT_COUNTS:
            mine = rekey[str(count)][metric]["meshchat"].median
            naive = rekey[str(count)][metric]["naive"].median
            table.add_row(
                f"{label}, {count:,} devices",
                f"{mine:,.{digits}f}",
                *_budget_cells(budget.get(f"rekey_{count}_{metric}")),
                f"{naive:,.{digits}f}",
                _ratio(mine, naive),
            )
    return table


def _to_json(value: object) -> object:
    if isinstance(value, Series):
        return {"median": value.median, "runs": value.runs}
    if isinstance(value, Check):
        return asdict(value) | {"budget": value.budget, "passed": value.passed}
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _machine() -> dict[str, object]:
    packages = {}
    for name in ("pynacl", "msgpack", "meshchat"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "packages": packages,
    }


def document(
    *,
    params: Params,
    quick: bool,
    ts: int,
    started: datetime,
    seconds: float,
    sizes: Sizes,
    throughput: Throughput,
    rekey: Rekey,
    budget: Mapping[str, Check],
) -> dict[str, Any]:
    """Everything measured, the budgets and the ratios, as written to the JSON file."""
    ratios: dict[str, dict[str, float]] = {}
    for key, row in sizes.items():
        ratios[f"bytes.{key}"] = {
            f"meshchat/{other}": row["meshchat"] / row[other]
            for other in row
            if other != "meshchat"
        }
    for step, by_format in throughput.items():
        if step == VERIFY_STEP:
            continue
        ratios[f"throughput.{step}"] = {
            "meshchat/naive_json": by_format["meshchat"].median / by_format["naive_json"].median
        }
    for count, metrics in rekey.items():
        for metric, by_method in metrics.items():
            ratios[f"rekey.{count}.{metric}"] = {
                "meshchat/naive": by_method["meshchat"].median / by_method["naive"].median
            }
    return {
        "benchmark": "e2ee",
        "timestamp": started.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
        "mode": "quick" if quick else "default",
        "machine": _machine(),
        "parameters": asdict(params)
        | {
            "topic": TOPIC,
            "sender": SENDER,
            "ts": ts,
            "text_sizes": TEXT_SIZES,
            "throughput_text": THROUGHPUT_TEXT,
            "recipient_counts": RECIPIENT_COUNTS,
            "clock": "time.process_time (CPU of this single-threaded process)",
        },
        "bytes": sizes,
        "throughput_msg_per_s": throughput,
        "rekey": rekey,
        "ratios": ratios,
        "budgets": budget,
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write JSON ({DEFAULT_JSON})"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print the three tables, write the JSON."""
    args = _parse(argv)
    params = QUICK if args.quick else Params()
    # Piped output would wrap the tables at 80 columns; a log file is read wide.
    console = Console(width=None if sys.stdout.isatty() else 150)
    ts = int(time.time())
    started = datetime.now(UTC)
    clock = time.monotonic()

    def progress(what: str) -> None:
        console.print(f"[dim]{time.monotonic() - clock:6.1f}s[/dim] {what}", highlight=False)

    progress("bytes per message")
    sizes = measure_sizes(ts)
    progress(f"throughput: {params.throughput_reps} x {params.messages:,} messages per format")
    throughput = measure_throughput(params, ts)
    progress(f"rekey: {', '.join(map(str, RECIPIENT_COUNTS))} recipients")
    rekey = measure_rekey(params, ts)
    seconds = time.monotonic() - clock
    budget = checks(sizes, throughput, rekey)

    console.print()
    console.print(size_table(sizes, budget))
    console.print(throughput_table(throughput, budget))
    console.print(rekey_table(rekey, budget))
    missed = [check for check in budget.values() if not check.passed]
    console.print(
        f"budgets met: {len(budget) - len(missed)} of {len(budget)}. ratio = meshchat / "
        "reference: below 1 is better for bytes and CPU, above 1 for msg/s. "
        f"Total {seconds:.1f} s.",
        style="dim",
        highlight=False,
    )
    for check in missed:
        console.print(
            f"[red]missed[/red]: {check.key} = {check.value:,.1f}, budget {check.budget}: "
            f"{check.miss}",
            highlight=False,
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            document(
                params=params,
                quick=args.quick,
                ts=ts,
                started=started,
                seconds=seconds,
                sizes=sizes,
                throughput=throughput,
                rekey=rekey,
                budget=budget,
            ),
            indent=2,
            default=_to_json,
        )
        + "\n"
    )
    console.print(f"wrote {args.json}", style="dim")
    return 0


if __name__ == "__main__":
    sys.exit(main())
