"""The explain report: for every graph kernelstack compiled, what each pass matched, what it left and
why, which kernelstack ops the graph now calls and which implementation each runs on that device,
plus runtime decisions (fallbacks, buckets, recompiles) recorded while generating.

``ksbackend.explain()`` returns it; ``print()`` it for a table.
"""

import collections
import logging

from dataclasses import dataclass
from dataclasses import field

log = logging.getLogger("ksbackend")


@dataclass
class GraphReport:
    index: int
    device: str
    executor: str
    nodes_before: int
    nodes_after: int = 0
    passes: list = field(default_factory=list)  # PassResult
    ops: dict = field(default_factory=dict)  # kernelstack op -> count in the final graph
    implementations: dict = field(default_factory=dict)  # kernelstack op -> what runs it on this device
    compile_ms: float = 0.0
    purpose: str = ""  # the path this graph serves (e.g. "prefill", "decode"), when known
    reason: str = ""  # why it was compiled: the first call of its path, or the guard that failed
    inputs: str = ""  # the example inputs' shapes (symbols are dynamic dimensions)
    packed: int = 0  # weight groups laid out back to back for a fused GEMM
    collectives: dict = field(default_factory=dict)  # collective -> count, kept as is (tensor parallel)

    def pass_result(self, name):
        return next((p for p in self.passes if p.name == name), None)

    def matched(self, name) -> int:
        result = self.pass_result(name)
        return len(result.matched) if result else 0

    def to_text(self, verbose=False) -> str:
        lines = [f"graph {self.index} on {self.device}" + (f" ({self.purpose}: {self.reason})" if self.purpose else "")
                 + f": {self.nodes_before} -> {self.nodes_after} nodes, executor {self.executor}, "
                 f"compiled in {self.compile_ms:.0f} ms, inputs {self.inputs}"]
        for p in self.passes:
            status = f"FAILED and undone: {p.error}" if p.error else f"matched {len(p.matched)}, left {len(p.left)}"
            lines.append(f"  pass {p.name:<13} {status} ({p.elapsed_ms:.1f} ms)")
            if verbose:
                lines += [f"      + {site}" for site in p.matched]
            reasons = collections.Counter(reason for _, reason in p.left)
            for reason, count in reasons.items():
                example = next(site for site, r in p.left if r == reason)
                lines.append(f"      - left {count}x: {reason} (e.g. {example})")
        if self.packed:
            lines.append(f"  weights: {self.packed} groups laid out back to back (one GEMM each reads one buffer)")
        for op, count in sorted(self.ops.items()):
            lines.append(f"  op {op:<28} x{count:<4} runs as: {self.implementations.get(op, '?')}")
        for name, count in sorted(self.collectives.items()):
            lines.append(f"  collective {name} x{count} kept (tensor parallel)")
        return "\n".join(lines)


@dataclass
class ExplainReport:
    graphs: list = field(default_factory=list)
    events: list = field(default_factory=list)  # runtime decisions, in order

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self, verbose=False) -> str:
        if not self.graphs and not self.events:
            return "kernelstack: nothing compiled yet"
        parts = [g.to_text(verbose) for g in self.graphs]
        if self.events:
            counts = collections.Counter(self.events)
            parts.append("runtime:\n" + "\n".join(f"  {e}" + (f" (x{n})" if n > 1 else "") for e, n in counts.items()))
        return "\n".join(parts)

    def matched(self, name) -> int:
        return sum(g.matched(name) for g in self.graphs)


class Recorder:
    """Collects graph reports and runtime events (one process-wide, and one per optimized model)."""

    def __init__(self, keep=256):
        self.graphs = collections.deque(maxlen=keep)
        self.events = collections.deque(maxlen=4 * keep)

    def add_graph(self, report: GraphReport):
        self.graphs.append(report)

    def forget_graphs(self, reports) -> None:
        """Drop these very reports (a compile thrown away), by identity: an equal report may be another graph's."""
        kept = [g for g in self.graphs if all(g is not r for r in reports)]
        self.graphs.clear()
        self.graphs.extend(kept)

    def event(self, message: str, level=logging.INFO):
        self.events.append(message)
        log.log(level, "%s", message)

    def snapshot(self) -> ExplainReport:
        return ExplainReport(list(self.graphs), list(self.events))

    def clear(self):
        self.graphs.clear()
        self.events.clear()


GLOBAL = Recorder()
