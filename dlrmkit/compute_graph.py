"""--plot-compute-graph: the autograd graph of the loss, as Graphviz source and a PDF.

The .dot source comes from torchviz when it is installed, else from a walk of the
autograd graph here (same idea: one box per backward function, parameters named and
shaped). It is rendered to PDF when Graphviz's `dot` program is on the PATH.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

import torch

from dlrmkit import outputs


def autograd_dot(output: torch.Tensor, params: dict) -> str:
    """Graphviz source of the autograd graph that produced `output`."""
    names = {id(p): name for name, p in params.items()}
    lines = ["digraph autograd {", '  node [shape=box, style=filled, fillcolor=lightgrey, fontsize=10];',
             f'  "output" [label="output\\n{tuple(output.shape)}", fillcolor=darkolivegreen1];']
    # the visited nodes are kept, not only their ids: some torch versions free a node's Python object
    # once nothing holds it and make a new one at the next access, and a freed object's id can come
    # back for another node
    seen, stack = {}, []
    if output.grad_fn is not None:
        lines.append(f'  "{id(output.grad_fn)}" -> "output";')
        stack.append(output.grad_fn)
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen[id(fn)] = fn
        variable = getattr(fn, "variable", None)
        if variable is not None:  # AccumulateGrad: a leaf, usually a parameter
            label = f"{names.get(id(variable), 'leaf')}\\n{tuple(variable.shape)}"
            lines.append(f'  "{id(fn)}" [label="{label}", fillcolor=lightblue];')
        else:
            lines.append(f'  "{id(fn)}" [label="{type(fn).__name__}"];')
        for next_fn, _ in fn.next_functions:
            if next_fn is not None:
                lines.append(f'  "{id(next_fn)}" -> "{id(fn)}";')
                stack.append(next_fn)
    lines.append("}")
    return "\n".join(lines) + "\n"


def graph_source(output: torch.Tensor, params: dict) -> str:
    try:
        from torchviz import make_dot
    except ImportError:
        return autograd_dot(output, params)
    return make_dot(output, params=params).source


def write_compute_graph(output: torch.Tensor, params: dict, path: str, log=print, note=None) -> str | None:
    """Writes the .dot source to `path`; renders `path` with .pdf when `dot` exists. Returns the PDF path or None.
    `log` says what was written; `note` (default: standard error) why no PDF was."""
    if note is None:
        def note(text):
            print(text, file=sys.stderr)
    source = graph_source(output, params)

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(source)
    outputs.write_atomically("--compute-graph-file", path, write)  # an OutputError when it cannot
    log(f"Wrote the compute graph's Graphviz source to {path}")
    dot = shutil.which("dot")
    pdf = os.path.splitext(path)[0] + ".pdf"
    if dot is None:
        note(f"note: Graphviz `dot` not found, so no PDF; render it with: dot -Tpdf {shlex.quote(path)} "
            f"-o {shlex.quote(pdf)}")
        return None
    result = subprocess.run([dot, "-Tpdf", path, "-o", pdf], capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit status {result.returncode}"
        note(f"note: `dot` could not render {path}: {reason}")
        return None
    log(f"Rendered the compute graph to {pdf}")
    return pdf
