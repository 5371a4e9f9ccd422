"""A workflow's plan drawn as a graph (server-side SVG), each node coloured by the status
of its step in the workflow's status document.

Layout: layers from left to right (a step's layer is the longest path to it along
``next_step``, ``on_failure`` and ``dependencies``, back edges left out); a ``fan_out``
step's sub-tasks hang under it, and a compensation under what it undoes. Edges:
``next_step`` (solid), ``on_failure`` (red), ``dependencies`` (dotted), fan-out children
(thin) and compensations (dashed). Every node carries ``data-step`` and ``data-status``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from html import escape
from typing import Any

from markupsafe import Markup

from chassis.plan import PAUSE, Compensate, Plan
from chassis.state import compensation_of

NODE_W, NODE_H = 196, 58
SUB_INDENT = 18
COMP_H = 58
ROW_GAP, BLOCK_GAP, COL_GAP = 10, 30, 72
MARGIN_X, MARGIN_Y = 16, 34

#: Node status -> colour class (tone). NOT_RUN: the step has no attempt yet; PAUSED:
#: the workflow waits for a person there; COMPENSATED: completed, then undone.
TONES: dict[str, str] = {
    "COMPLETED": "done", "FAILED": "failed",
    "RUNNING": "active", "DISPATCHED": "active", "AWAITING": "active",
    "SCHEDULED": "waiting", "PAUSED": "waiting",
    "CANCELLED": "undone", "COMPENSATED": "undone",
    "NOT_RUN": "idle",
}
#: The legend: (tone, words), in the order shown.
LEGEND = (("done", "Completed"), ("active", "Running / dispatched"),
          ("waiting", "Paused / retry due"), ("failed", "Failed"),
          ("undone", "Cancelled / compensated"), ("idle", "Not run"))
EDGE_LEGEND = (("next", "next step"), ("dependency", "dependency"),
               ("fan_out", "fan-out sub-task"), ("failure", "on failure"),
               ("compensation", "compensation"))


@dataclass
class Node:
    name: str
    """The step's (sub-task's, compensation's) name in the status document."""
    label: str
    action: str
    kind: str  # step | sub_task | compensation
    status: str
    x: float = 0
    y: float = 0
    w: float = NODE_W
    h: float = NODE_H

    @property
    def tone(self) -> str:
        return TONES.get(self.status, "idle")

    @property
    def right(self) -> float:
        return self.x + self.w

    @property
    def mid(self) -> float:
        return self.y + self.h / 2

    @property
    def bottom(self) -> float:
        return self.y + self.h


@dataclass
class Edge:
    source: str
    target: str
    kind: str  # next | failure | dependency | fan_out | compensation


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    width: float = 0
    height: float = 0


def node_status(name: str, action: str, doc: Mapping[str, Any],
                rows: Mapping[str, Mapping[str, Any]]) -> str:
    """What a node shows: its step's latest attempt's status, PAUSED where the workflow
    waits for a person, COMPENSATED once undone, NOT_RUN before its first attempt."""
    row = rows.get(name)
    status = str(row["status"]) if row else "NOT_RUN"
    paused = doc.get("status") == "PAUSED_FOR_HUMAN_INPUT"
    if paused and name == doc.get("current_step") and status not in ("COMPLETED", "FAILED"):
        return "PAUSED"
    if action == PAUSE and status == "AWAITING":
        return "PAUSED"
    undo = rows.get(compensation_of(name))
    if status == "COMPLETED" and undo is not None and undo.get("status") == "COMPLETED":
        return "COMPENSATED"
    return status


def _layers(plan: Plan) -> dict[str, int]:
    """Each step's column: the longest path to it, back edges (cycles) left out."""
    owner = {st.step_name: name for name, s in plan.steps.items() for st in s.sub_tasks}
    out: dict[str, list[str]] = {name: [] for name in plan.steps}
    for name, step in plan.steps.items():
        for target in (step.next_step, step.on_failure):
            if target in plan.steps:
                out[name].append(target)
        for dep in step.dependencies:
            source = dep if dep in plan.steps else owner.get(dep)
            if source is not None and source != name:
                out[source].append(name)
    order: list[str] = []  # reverse post-order of a depth-first walk: a topological order
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    forward: dict[str, list[str]] = {name: [] for name in plan.steps}
    roots = [plan.start_step] if plan.start_step in plan.steps else []
    for root in [*roots, *plan.steps]:
        if root in state:
            continue
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(out[root]))]
        state[root] = 1
        while stack:
            name, rest = stack[-1]
            target = next(rest, None)
            if target is None:
                stack.pop()
                state[name] = 2
                order.append(name)
            elif state.get(target) == 1:
                continue  # a back edge: drawn, not used for layers
            else:
                forward[name].append(target)
                if target not in state:
                    state[target] = 1
                    stack.append((target, iter(out[target])))
    layer = dict.fromkeys(plan.steps, 0)
    for name in reversed(order):
        for target in forward[name]:
            layer[target] = max(layer[target], layer[name] + 1)
    return layer


def layout(plan: Plan, doc: Mapping[str, Any]) -> Graph:
    """The plan's nodes placed, with their edges and statuses from ``doc`` (a status
    document)."""
    rows = {str(d["name"]): d for d in doc.get("steps") or []}
    g = Graph()
    layer = _layers(plan)
    columns: dict[int, list[str]] = {}
    for name in plan.steps:
        columns.setdefault(layer[name], []).append(name)

    def add(name: str, label: str, action: str, kind: str, x: float, y: float, w: float,
            h: float) -> Node:
        node = Node(name, label, action, kind, node_status(name, action, doc, rows),
                    x, y, w, h)
        g.nodes[name] = node
        return node

    def add_undo(owner: Node, comp: Compensate, x: float, y: float) -> float:
        name = compensation_of(owner.name)
        w = owner.right - x
        add(name, f"undo {owner.label}", comp.action, "compensation", x, y, w, COMP_H)
        g.edges.append(Edge(owner.name, name, "compensation"))
        return y + COMP_H + ROW_GAP

    for col, names in sorted(columns.items()):
        x = MARGIN_X + col * (NODE_W + COL_GAP)
        y: float = MARGIN_Y
        for name in names:
            step = plan.steps[name]
            node = add(name, name, step.action, "step", x, y, NODE_W, NODE_H)
            y += NODE_H + ROW_GAP
            for st in step.sub_tasks:
                sx = x + SUB_INDENT
                sub = add(st.step_name, st.step_name, st.resolved_action, "sub_task",
                          sx, y, NODE_W - SUB_INDENT, NODE_H)
                g.edges.append(Edge(name, st.step_name, "fan_out"))
                y += NODE_H + ROW_GAP
                if st.compensate is not None:
                    y = add_undo(sub, st.compensate, sx + SUB_INDENT, y)
            if step.compensate is not None:
                y = add_undo(node, step.compensate, x + SUB_INDENT, y)
            g.height = max(g.height, y - ROW_GAP)
            y += BLOCK_GAP - ROW_GAP
        g.width = max(g.width, x + NODE_W)
    for name, step in plan.steps.items():
        if step.next_step in plan.steps:
            g.edges.append(Edge(name, step.next_step, "next"))
        if step.on_failure in plan.steps:
            g.edges.append(Edge(name, step.on_failure, "failure"))
        for dep in step.dependencies:
            if dep in g.nodes and dep != name:
                g.edges.append(Edge(dep, name, "dependency"))
    g.width += MARGIN_X + 24
    g.height = max(g.height, MARGIN_Y + NODE_H) + MARGIN_Y - 8
    return g


def _f(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _path(e: Edge, a: Node, b: Node) -> str:
    if e.kind == "fan_out":  # down the parent's left side, into the child
        px = a.x + SUB_INDENT / 2
        return f"M{_f(px)},{_f(a.bottom)} V{_f(b.mid)} H{_f(b.x)}"
    if e.kind == "compensation":  # a bracket on the right
        out = a.right + (10 if a.kind == "sub_task" else 18)
        ay = a.mid + 8
        return f"M{_f(a.right)},{_f(ay)} H{_f(out)} V{_f(b.mid)} H{_f(b.right)}"
    shift = 12 if e.kind == "dependency" else (-10 if e.kind == "failure" else 0)
    if b.x > a.right:  # forwards: a curve from right side to left side
        ay, by = a.mid + shift, b.mid + shift
        c = (b.x - a.right) / 2
        return (f"M{_f(a.right)},{_f(ay)} C{_f(a.right + c)},{_f(ay)} "
                f"{_f(b.x - c)},{_f(by)} {_f(b.x)},{_f(by)}")
    # backwards (a loop) or within a column: over the top
    top = min(a.y, b.y) - MARGIN_Y + 8
    ax, bx = a.x + a.w / 2 + shift, b.x + b.w / 2 - shift
    return f"M{_f(ax)},{_f(a.y)} C{_f(ax)},{_f(top)} {_f(bx)},{_f(top)} {_f(bx)},{_f(b.y)}"


def _clip(text: str, width: float, px: float) -> str:
    most = max(4, int((width - 30) / px))
    return text if len(text) <= most else text[:most - 1] + "…"


STATUS_WORDS = {"NOT_RUN": "not run", "PAUSED": "paused", "AWAITING": "awaiting"}


def _node_svg(n: Node) -> str:
    status = STATUS_WORDS.get(n.status, n.status.lower())
    title = f"{n.name} ({n.kind.replace('_', ' ')}): {n.action}, {status}"
    return (
        f'<a href="#step-{escape(n.name)}" class="node-link">'
        f'<g class="node tone-{n.tone} kind-{n.kind}" data-step="{escape(n.name)}" '
        f'data-status="{escape(n.status)}" transform="translate({_f(n.x)},{_f(n.y)})">'
        f"<title>{escape(title)}</title>"
        f'<rect width="{_f(n.w)}" height="{_f(n.h)}" rx="7"/>'
        f'<text class="node-name" x="11" y="19">{escape(_clip(n.label, n.w, 7.4))}</text>'
        f'<text class="node-action" x="11" y="34">{escape(_clip(n.action, n.w, 6.4))}</text>'
        f'<circle class="dot" cx="15" cy="45.5" r="3.5"/>'
        f'<text class="node-status" x="23" y="49">{escape(status)}</text>'
        "</g></a>")


def svg(g: Graph, title: str = "Plan graph") -> Markup:
    """The graph as an inline ``<svg>`` (styled by console.css)."""
    parts = [f'<svg class="plan-graph" xmlns="http://www.w3.org/2000/svg" '
             f'width="{_f(g.width)}" height="{_f(g.height)}" '
             f'viewBox="0 0 {_f(g.width)} {_f(g.height)}" role="img" '
             f'aria-label="{escape(title)}"><defs>']
    for kind in ("next", "failure", "dependency", "fan_out", "compensation"):
        parts.append(f'<marker id="arrow-{kind}" class="arrow arrow-{kind}" '
                     'viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
                     'markerHeight="7" orient="auto-start-reverse">'
                     '<path d="M0,1 L10,5 L0,9 z"/></marker>')
    parts.append("</defs><g class=\"edges\">")
    for e in g.edges:
        a, b = g.nodes.get(e.source), g.nodes.get(e.target)
        if a is None or b is None:
            continue
        parts.append(f'<path class="edge edge-{e.kind}" d="{_path(e, a, b)}" '
                     f'marker-end="url(#arrow-{e.kind})" data-from="{escape(e.source)}" '
                     f'data-to="{escape(e.target)}"/>')
    parts.append('</g><g class="nodes">')
    parts.extend(_node_svg(n) for n in g.nodes.values())
    parts.append("</g></svg>")
    return Markup("".join(parts))


def plan_svg(plan: Plan, doc: Mapping[str, Any]) -> Markup:
    """The plan of a workflow as SVG, coloured by its status document ``doc``."""
    return svg(layout(plan, doc), f"Plan of {plan.name or 'the workflow'}")


def plan_order(plan: Plan) -> list[str]:
    """The names of the plan's steps and sub-tasks as drawn (column by column)."""
    layer = _layers(plan)
    out: list[str] = []
    for name in sorted(plan.steps, key=lambda n: layer[n]):
        out.append(name)
        out.extend(st.step_name for st in plan.steps[name].sub_tasks)
    return out


__all__ = ["EDGE_LEGEND", "LEGEND", "TONES", "Graph", "layout", "node_status",
           "plan_order", "plan_svg", "svg"]
