"""The ```python blocks of README.md and docs/*.md run: one test case per block, each in a fresh process.

Every fenced ```python block of README.md and docs/*.md (docs/benchmarks.md holds none to run) is a test
case with an id ``FILE:N`` (its number in the file, counted from 1), e.g. ``pytorch.md:3``. A block runs
as a script in a fresh subprocess (``sys.executable``, in a temporary folder, with a timeout), with
``OMP_NUM_THREADS=1`` and ``NUMBA_NUM_THREADS=1`` (the parent's ``NUMBA_CACHE_DIR`` is kept) and, when
the code does not choose one, ``KERAS_BACKEND`` (the environment's, else ``torch``). A block that needs an
optional framework that is not installed here (keras, lightning, transformers, accelerate, jax, dask,
faiss, tensorboard, wandb) is skipped, naming it.

Marker convention. A block is run as it stands unless HTML comment lines *directly* above its opening
fence (no blank line between; invisible on GitHub and in the mkdocs site) say otherwise, one directive
per line::

    <!-- docs-test: setup torch-data -->
    ```python

The directives:

``setup NAME``
    Run the prelude ``NAME`` of ``PRELUDES`` below before the block. A prelude stands in for what the
    prose says the reader already has (``model``, ``train_set``, ``opt``, ...): tiny synthetic data and
    models, built inside a function so that only the documented names leak (never an import the block
    forgot). A prelude named after a page's earlier block (``ddp-script``) also gives that block's
    imports, because the block is a fragment of that script. Several ``setup`` lines run in order.
``continues``
    The block continues the previous ```python block of the same file (it uses names defined there): it
    runs after that block (and after whatever that block runs after), in one process.
``signature [MODULE]``
    The block lists call signatures, ``[result =] name(parameters)``, which are not runnable code. Each is
    checked against ``inspect.signature`` of the real callable (a dotted name is imported as written, a
    bare one is looked up in ``MODULE``): the same parameters in the same order, the same kinds (a bare
    ``*`` marks the keyword-only ones) and the same defaults.
``keys-of EXPR``
    The block is an output shown as a dict literal (``...`` for run-dependent values): after the setup it
    is evaluated, and its keys must be exactly those of ``EXPR``.
``torchrun N``
    Run the block as a script under ``torch.distributed.run --standalone --nproc-per-node N``.
``needs-file PATH``
    Skip (naming it) when ``PATH`` does not exist, e.g. the Fashion-MNIST package.
``slow (REASON)``
    Mark the case ``pytest.mark.slow`` (``make test-slow``; not in the default run). For a block that
    runs here but takes too long for the default suite; the reason says why.
``warns (REGEX)``
    The block is meant to print a warning: one whose ``Category: message`` matches REGEX (``re.search``)
    must appear on its stderr, and is allowed there. Any other warning a block prints fails its case, so a
    change that makes a documented example warn is seen (the stand-in data are sized so that the pages'
    loaders fit their budgets without the budget-rounding warning).
``skip (REASON)``
    Do not run the block. Only for a block that truly cannot run here (it needs a GPU, several machines,
    a hub download or a file the page does not make); the reason is required and says which.

The test skips, with the reason, when README.md and docs/ are not next to the tests folder (CI also runs a
copy of tests/ against the installed wheel, outside the source tree).

Cost (2026-12-02, 2 cores, warm Numba cache): the default cases take about 100 s of CPU, most of it
importing torch, Keras, Lightning and transformers once per block; 72 s wall with ``-n 2`` on a quiet
machine, 96 s while other jobs kept it busy. With an empty Numba cache the two selection examples compile
the NumPy kernels first (about 65 s each when they run side by side).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_FILES = {"benchmarks.md"}  # no block to run
OPTIONAL = ("keras", "lightning", "transformers", "accelerate", "jax", "dask", "faiss", "tensorboard", "wandb")
# torch is a requirement of the development environment (a missing torch fails there); the lower-bounds run
# (`make test-lower`) has none, and skips the blocks that import it
OPTIONAL += ("torch",) if importlib.util.find_spec("torch") is None else ()
# what a block can use without importing the framework by name
IMPLIED = {
    "crestcore.adapters.keras": "keras",
    "crestcore.apps.keras_demo": "keras",
    "crestcore.adapters.lightning": "lightning",
    "crestcore.adapters.huggingface": "transformers",
    "crestcore.adapters.dask": "dask",
    "torch.utils.tensorboard": "tensorboard",
    "lightning.pytorch": "lightning",
}
IMPLIED_NAMES = {"WandbWriter": "wandb", "TensorBoardWriter": "tensorboard"}
TIMEOUT = 300  # seconds a block may take (a cold Numba cache: about 35 s alone, 65 s beside another compile)
SLOW_TIMEOUT = 1800
DIRECTIVE = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")


# ------------------------------------------------------------------------------------------------
# preludes: the reader's own objects, as tiny synthetic stand-ins
# ------------------------------------------------------------------------------------------------
# the stand-ins' training examples: 20 full-data steps of the pages' m = 128, so that their budget of 0.1 is
# two whole steps an epoch and no example prints the budget-rounding warning (see test_docs_example's
# warning check; with 256 examples every loader example printed it, and a new warning went unseen)
N_TRAIN = 2560
_TORCH_DATA = '''
def _docs_test_torch_data():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    centers = 3.0 * torch.randn(10, 20, generator=g)
    y = torch.arange(N_TRAIN + 64) % 10
    x = centers[y] + torch.randn(N_TRAIN + 64, 20, generator=g)
    train_set = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])       # 2,560 examples of 10 classes, 20 features
    val_set = TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    val_loader = DataLoader(val_set, batch_size=64)

    def validate(model):
        with torch.no_grad():
            return sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in val_loader) / len(val_set)

    return dict(model=model, train_set=train_set, train_set_without_augmentation=train_set, val_loader=val_loader,
                opt=opt, sched=sched, validate=validate, device=torch.device("cpu"))


globals().update(_docs_test_torch_data())
del _docs_test_torch_data
'''.replace("N_TRAIN", str(N_TRAIN))

_TORCH_LOOP = _TORCH_DATA + '''
# pytorch.md's quickstart, one epoch into its run: its imports, its loader, the epoch, a checkpoint path
import torch.nn.functional as F
from crestcore import CrestConfig
from crestcore.adapters.torch import CrestLoader

loader = CrestLoader(model, train_set, config=CrestConfig(m=128), budget=0.1, epochs=200, seed=0)
for epoch in range(1):
    for x, y, w in loader:
        loss = (w * F.cross_entropy(model(x), y, reduction="none")).mean()
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
path = "ckpt.pt"
'''

_DDP_SCRIPT = _TORCH_DATA + '''
# distributed.md's train_ddp.py after its loader was built (run under torchrun): its imports and objects
import os
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from crestcore import CrestConfig
from crestcore.adapters.distributed import DistributedCrestLoader

dist.init_process_group("gloo")
ddp = DDP(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
loader = DistributedCrestLoader(ddp, train_set, config=CrestConfig(m=128), budget=0.1, epochs=200, seed=0)
path = "ckpt.pt"


def _docs_test_teardown():  # the script's own ending (as in train_ddp.py): past the last collective, group released
    import gc
    dist.barrier()
    for name in ("loader", "ddp", "opt", "ckpt"):
        globals().pop(name, None)
    gc.collect()
    dist.destroy_process_group()


import atexit  # noqa: E402
atexit.register(_docs_test_teardown)
'''

_DDP_FUNCTIONS = '''
def build_model():
    import torch
    return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def build_dataset():
    import torch
    from torch.utils.data import TensorDataset
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N_TRAIN) % 10
    return TensorDataset(3.0 * torch.randn(10, 20, generator=g)[y] + torch.randn(N_TRAIN, 20, generator=g), y)


def validate(model):
    """The reader's own validation loop, which the page's loop calls: nothing to check here."""
'''.replace("N_TRAIN", str(N_TRAIN))

_KERAS_DATA = '''
def _docs_test_keras_data():
    import os
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    y = np.arange(N_TRAIN + 64) % 10
    x = (3.0 * rng.normal(size=(10, 20))[y] + rng.normal(size=(N_TRAIN + 64, 20))).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    return dict(model=model, x_train=x[:N_TRAIN], y_train=y[:N_TRAIN], x_test=x[N_TRAIN:], y_test=y[N_TRAIN:])


globals().update(_docs_test_keras_data())
del _docs_test_keras_data
'''.replace("N_TRAIN", str(N_TRAIN))

_KERAS_COMPILED = _KERAS_DATA + '''
import keras
model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
'''

_KERAS_RUN = _KERAS_COMPILED + '''
# keras.md's quickstart, two epochs into its run
from crestcore import CrestConfig
from crestcore.adapters.keras import CrestCallback

crest = CrestCallback(x_train, y_train, config=CrestConfig(m=128), budget=0.1, seed=0)
model.fit(crest.dataset, epochs=2, callbacks=[crest], verbose=0)
done_epochs = 2
'''

_KERAS_MIDEPOCH = _KERAS_COMPILED + '''
# a run stopped inside an epoch: a callback that stops the fit after its sixth step (40 steps an epoch)
import keras
from crestcore import CrestConfig
from crestcore.adapters.keras import CrestCallback


class _StopAfter(keras.callbacks.Callback):
    def __init__(self, steps):
        super().__init__()
        self.steps, self.seen = steps, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        self.model.stop_training = self.seen >= self.steps


crest = CrestCallback(x_train, y_train, config=CrestConfig(m=16), budget=0.25, seed=0)
model.fit(crest.dataset, epochs=4, callbacks=[crest, _StopAfter(6)], verbose=0)
e, k = divmod(crest.position, crest.steps_per_epoch)
assert k, "the setup must stop inside an epoch"
'''

_HF_DATA = '''
def _docs_test_hf_data():
    import torch
    import transformers
    from accelerate import Accelerator

    class Tokenized(torch.utils.data.Dataset):   # 320 "tokenized" sequences of 8 tokens, 4 classes
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.labels = torch.arange(320) % 4
            self.ids = torch.randint(5, 100, (320, 8), generator=g)
            self.ids[:, 0] = self.labels + 1       # a token that gives the class away

        def __len__(self):
            return 320

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                    "labels": self.labels[i]}

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=4)
    model = transformers.BertForSequenceClassification(config)   # built from a config: no download
    data = Tokenized()
    return dict(model=model, tokenized_train=data, train=data, collator=transformers.default_data_collator,
                opt=torch.optim.AdamW(model.parameters(), lr=1e-3), accelerator=Accelerator(cpu=True))


globals().update(_docs_test_hf_data())
del _docs_test_hf_data
'''

_CONTROLLER = '''
def _docs_test_controller():
    import numpy as np
    from crestcore import CrestConfig, crest_init

    class SoftmaxOps:   # a ModelOps: softmax regression z = x W on NumPy arrays
        def __init__(self, X, y, C):
            self.X, self.y, self.W = X, y, np.zeros((X.shape[1], C))

        def outputs(self, indices, embeddings=False):
            return self.X[indices] @ self.W

        def params(self):
            return self.W.ravel().copy()

        def _probs(self, indices):
            z = self.X[indices] @ self.W
            p = np.exp(z - z.max(1, keepdims=True))
            return p / p.sum(1, keepdims=True)

        def losses(self, indices):
            return -np.log(self._probs(indices)[np.arange(len(indices)), self.y[indices]])

        def gradient(self, indices, weights):
            G = self._probs(indices)
            G[np.arange(len(indices)), self.y[indices]] -= 1.0
            grad = self.X[indices].T @ (G * weights[:, None]) / len(indices)
            return float(np.mean(weights * self.losses(indices))), grad.ravel()

        def hutchinson(self, indices, weights, seed):
            X = self.X[indices]
            z = np.random.default_rng(seed).choice([-1.0, 1.0], size=self.W.size)
            P, A = self._probs(indices), X @ z.reshape(self.W.shape)
            HA = P * A - P * np.sum(P * A, axis=1, keepdims=True)
            return z * (X.T @ (HA * weights[:, None]) / len(indices)).ravel()

    rng = np.random.default_rng(0)
    y = np.arange(400) % 4
    X = rng.normal(size=(400, 5)) + 2.0 * np.eye(4, 5)[y]
    ops, config = SoftmaxOps(X, y, 4), CrestConfig(m=16, T2=10)

    def train_step(indices, weights):   # one SGD step on the weighted batch; the batch's losses before it
        losses = ops.losses(indices)
        ops.W -= 0.5 * ops.gradient(indices, weights)[1].reshape(ops.W.shape)
        return losses

    return dict(ops=ops, config=config, state=crest_init(config, y, seed=0), train_step=train_step)


globals().update(_docs_test_controller())
del _docs_test_controller
'''

_SCORE_ORDERS = '''
def _docs_test_score_orders():
    import numpy as np
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    C = X[:40]
    M = 2 * float(np.max(np.linalg.norm(X - X.mean(0), axis=1)))   # a bound of every distance
    return dict(X=X, C=C, order_a=np.arange(10), order_b=np.arange(39, 29, -1), M=M)


globals().update(_docs_test_score_orders())
del _docs_test_score_orders
'''

_DASK_LOCAL = '''
def _docs_test_dask_local():
    import atexit
    import numpy as np
    from dask.distributed import Client

    client = Client(processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None)
    atexit.register(client.close)
    rng = np.random.default_rng(0)
    return dict(X=rng.normal(size=(600, 4)), k=30, labels=np.arange(600) % 3, client=client, options={})


globals().update(_docs_test_dask_local())
del _docs_test_dask_local
'''

_WANDB_RUN = '''
import wandb as _wandb
_wandb.init(mode="disabled")
'''

PRELUDES = {
    "torch-data": _TORCH_DATA,  # model, train_set, train_set_without_augmentation, val_loader, opt, sched, validate, device
    "torch-loop": _TORCH_LOOP,  # torch-data + pytorch.md quickstart: its imports, loader (one epoch trained), epoch, path
    "ddp-functions": _DDP_FUNCTIONS,    # build_model, build_dataset, validate (distributed.md's "yours")
    "ddp-script": _DDP_SCRIPT,          # torch-data + train_ddp.py's imports, process group, ddp, opt, loader, path
    "keras-data": _KERAS_DATA,          # model (not compiled), x_train, y_train, x_test, y_test
    "keras-compiled": _KERAS_COMPILED,  # keras-data, the model compiled as in keras.md's quickstart
    "keras-run": _KERAS_RUN,            # keras-data + keras.md's quickstart: compiled, imports, crest, done_epochs
    "keras-midepoch": _KERAS_MIDEPOCH,  # keras-data compiled, crest stopped inside an epoch: e, k
    "hf-data": _HF_DATA,                # model (tiny BERT), tokenized_train, train, collator, opt, accelerator
    "controller": _CONTROLLER,          # ops (NumPy softmax regression), config, state, train_step
    "score-orders": _SCORE_ORDERS,      # X, C, order_a, order_b, M
    "dask-local": _DASK_LOCAL,          # X, k, labels, client (in-process LocalCluster), options
    "wandb-run": _WANDB_RUN,            # an active (disabled) wandb run
}


# ------------------------------------------------------------------------------------------------
# finding the blocks
# ------------------------------------------------------------------------------------------------
@dataclass
class Block:
    file: str  # relative to ROOT
    number: int  # 1-based, among the file's ```python blocks
    line: int  # the opening fence's line, 1-based
    heading: str
    code: str
    directives: list[tuple[str, str]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{Path(self.file).name}:{self.number}"

    def get(self, key: str) -> list[str]:
        return [arg for k, arg in self.directives if k == key]


def _doc_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in SKIPPED_FILES)


def parse_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    heading, i = "", 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if line.startswith("#") and not fence:
            heading = line.lstrip("#").strip()
        if fence:
            marker, lang = fence.group(1), fence.group(2).lower()
            j = i + 1
            while j < len(lines) and not lines[j].startswith(marker):
                j += 1
            if lang == "python":
                directives = []
                k = i - 1
                while k >= 0 and DIRECTIVE.match(lines[k]):
                    text = DIRECTIVE.match(lines[k]).group(1)
                    key, _, arg = text.partition(" ")
                    directives.insert(0, (key, arg.strip()))
                    k -= 1
                blocks.append(Block(str(path.relative_to(ROOT)), len(blocks) + 1, i + 1, heading,
                                    "\n".join(lines[i + 1:j]) + "\n", directives))
            i = j
        i += 1
    return blocks


KNOWN = {"setup", "continues", "signature", "keys-of", "torchrun", "needs-file", "slow", "skip", "warns"}


def _reason(block: Block, key: str) -> str | None:
    args = block.get(key)
    if not args:
        return None
    m = re.fullmatch(r"\((.+)\)", args[0])
    if not m:
        raise ValueError(f"{block.id}: `{key}` needs a reason in parentheses, e.g. `{key} (needs a GPU)`")
    return m.group(1)


def _cases():
    if not (ROOT / "README.md").is_file() or not (ROOT / "docs").is_dir():
        return [pytest.param(None, id="no-docs", marks=pytest.mark.skip(
            reason=f"README.md and docs/ are not next to the tests folder ({ROOT}): not a source checkout"))]
    cases = []
    for path in _doc_files():
        for block in parse_blocks(path):
            marks = []
            if _reason(block, "slow") is not None:
                marks.append(pytest.mark.slow)
            skip = _reason(block, "skip")
            if skip is not None:
                marks.append(pytest.mark.skip(reason=f"{block.id}: {skip}"))
            cases.append(pytest.param(block, id=block.id, marks=marks))
    return cases


# ------------------------------------------------------------------------------------------------
# running them
# ------------------------------------------------------------------------------------------------
def _segment(block: Block) -> str:
    parts = []
    for name in block.get("setup"):
        if name not in PRELUDES:
            raise ValueError(f"{block.id}: unknown prelude {name!r} (known: {', '.join(PRELUDES)})")
        parts.append(f"# --- prelude {name} ---\n{PRELUDES[name]}")
    code = block.code
    for expr in block.get("keys-of"):  # a dict shown as output: its keys against the real one's
        code = (f"_docs_test_shown = {block.code.strip()}\n"
                f"_docs_test_real = {expr}\n"
                "_docs_test_only = sorted(set(_docs_test_shown) - set(_docs_test_real)), "
                "sorted(set(_docs_test_real) - set(_docs_test_shown))\n"
                f"assert _docs_test_only == ([], []), ('{block.id}: the documented keys differ from the real ones "
                "(documented only, code only): %s' % (_docs_test_only,))\n")
    parts.append(f"# --- {block.file}:{block.line + 1} (block {block.id}) ---\n{code}")
    return "\n".join(parts)


def compose(block: Block, blocks: list[Block]) -> tuple[str, list[Block]]:
    """The script of ``block``: the blocks it continues, each with its setup, then its own; and that chain."""
    chain = [block]
    while chain[0].get("continues"):
        if chain[0].number == 1:
            raise ValueError(f"{chain[0].id}: `continues` on a file's first block")
        chain.insert(0, blocks[chain[0].number - 2])
    return "\n".join(_segment(b) for b in chain), chain


def _needed_frameworks(code: str) -> list[str]:
    needed = set()
    try:
        tree = ast.parse(code)
    except SyntaxError:
        tree = None
    modules = []
    if tree is not None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules.append(node.module)
    for mod in modules:
        if mod.split(".")[0] in OPTIONAL:
            needed.add(mod.split(".")[0])
        for prefix, framework in IMPLIED.items():
            if mod == prefix or mod.startswith(prefix + "."):
                needed.add(framework)
    for name, framework in IMPLIED_NAMES.items():
        if re.search(rf"\b{name}\b", code):
            needed.add(framework)
    return sorted(needed)


def _env(shown: str) -> dict[str, str]:
    """The subprocess's environment; ``shown``: the code of the blocks run (the preludes not included)."""
    env = dict(os.environ)  # NUMBA_CACHE_DIR, when the parent has one, is kept
    env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
               MPLBACKEND="Agg")
    if "KERAS_BACKEND" not in shown:  # the block does not choose a Keras backend
        env["KERAS_BACKEND"] = os.environ.get("KERAS_BACKEND", "torch")
    return env


def _check_signatures(block: Block) -> None:
    module = block.get("signature")[0] or None
    code = block.code
    checked = 0
    # statements start at column 0: "[result[, result] =] dotted.name(" ... the matching ")"
    for m in re.finditer(r"^(?:[\w, ]+=\s*)?([A-Za-z_][\w.]*)\(", code, flags=re.M):
        name, depth, start = m.group(1), 1, m.end()
        pos = start
        while depth:
            depth += {"(": 1, ")": -1}.get(code[pos], 0)
            pos += 1
        params = code[start:pos - 1]
        documented = ast.parse(f"def _f({params}): pass").body[0].args
        if "." in name:
            mod_name, attr = name.rsplit(".", 1)
            obj = getattr(importlib.import_module(mod_name), attr)
        else:
            assert module, f"{block.id}: `signature` needs a module to look up {name!r} in"
            obj = getattr(importlib.import_module(module), name)
        real = inspect.signature(obj)
        got = _signature_of(documented)
        want = [(p.name, p.kind.name, "-" if p.default is inspect.Parameter.empty else repr(p.default))
                for p in real.parameters.values()]
        assert got == want, (f"{block.id} ({block.file}:{block.line}): the documented signature of {name} differs "
                             f"from the code's\n  documented: {_fmt(got)}\n  code:       {_fmt(want)}")
        checked += 1
    assert checked, f"{block.id}: `signature` block without a signature"


def _signature_of(args: ast.arguments) -> list[tuple[str, str, str]]:
    out = []
    pos = args.posonlyargs + args.args
    defaults = [None] * (len(pos) - len(args.defaults)) + list(args.defaults)
    for a, d in zip(pos, defaults):
        kind = "POSITIONAL_ONLY" if a in args.posonlyargs else "POSITIONAL_OR_KEYWORD"
        out.append((a.arg, kind, "-" if d is None else repr(ast.literal_eval(d))))
    if args.vararg:
        out.append((args.vararg.arg, "VAR_POSITIONAL", "-"))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        out.append((a.arg, "KEYWORD_ONLY", "-" if d is None else repr(ast.literal_eval(d))))
    if args.kwarg:
        out.append((args.kwarg.arg, "VAR_KEYWORD", "-"))
    return out


def _fmt(params: list[tuple[str, str, str]]) -> str:
    return ", ".join(f"{n}{'' if d == '-' else '=' + d}{'' if k == 'POSITIONAL_OR_KEYWORD' else ' [' + k + ']'}"
                     for n, k, d in params)


_ALL: dict[str, list[Block]] = {}


def _file_blocks(block: Block) -> list[Block]:
    if block.file not in _ALL:
        _ALL[block.file] = parse_blocks(ROOT / block.file)
    return _ALL[block.file]


@pytest.mark.parametrize("block", _cases())
def test_docs_example(block: Block, tmp_path: Path) -> None:
    unknown = sorted({k for k, _ in block.directives} - KNOWN)
    assert not unknown, f"{block.id}: unknown docs-test directive(s) {unknown} (known: {sorted(KNOWN)})"
    for path in block.get("needs-file"):
        if not Path(path).exists():
            pytest.skip(f"{block.id} needs {path}, which is not here")
    if block.get("signature"):
        _check_signatures(block)
        return
    code, chain = compose(block, _file_blocks(block))
    missing = [f for f in _needed_frameworks(code) if importlib.util.find_spec(f) is None]
    if missing:
        pytest.skip(f"{block.id} needs {', '.join(missing)}, not installed here")
    script = tmp_path / "docs_example.py"
    script.write_text(code, encoding="utf-8")
    cmd = [sys.executable, script.name]
    if block.get("torchrun"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               block.get("torchrun")[0], script.name]
    timeout = SLOW_TIMEOUT if block.get("slow") else TIMEOUT
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=_env("".join(b.code for b in chain)), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.id} ({block.file}:{block.line}) did not finish in {timeout} s")
    if proc.returncode != 0:
        gone = re.findall(r"No module named '([\w.]+)'", proc.stderr)
        optional = sorted({g.split(".")[0] for g in gone} & set(OPTIONAL))
        if optional:
            pytest.skip(f"{block.id} needs {', '.join(optional)}, which does not import here")
        numbered = "\n".join(f"{i:4d}  {line}" for i, line in enumerate(code.splitlines(), 1))
        pytest.fail(f"{block.id} ({block.file}:{block.line}, under {block.heading!r}) exited with "
                    f"{proc.returncode}\n--- script ---\n{numbered}\n--- stdout (end) ---\n{proc.stdout[-3000:]}\n"
                    f"--- stderr (end) ---\n{proc.stderr[-6000:]}", pytrace=False)
    _check_warnings(block, proc.stderr)


# warnings about the machine the test runs on, not about the example: torch's on pinned memory without a GPU
# (the pages pin memory for a GPU reader) and on more DataLoader workers than this machine's cores
MACHINE_WARNINGS = (r"^UserWarning: 'pin_memory' argument is set as true but no accelerator is found",
                    r"^UserWarning: This DataLoader will create \d+ worker processes in total\. Our suggested max")
WARNING_LINE = re.compile(r"^.+?:\d+: ((?:\w+\.)*\w*Warning: .*)$", re.MULTILINE)  # warnings' default format


def _check_warnings(block: Block, stderr: str) -> None:
    """The warnings a block printed (Python's ``file:line: Category: message`` lines) must each match one of
    its ``warns`` patterns or be about the machine (``MACHINE_WARNINGS``), and each pattern must match one of
    them."""
    printed = WARNING_LINE.findall(stderr)
    patterns = [_reason(block, "warns")] if block.get("warns") else []
    stray = [w for w in printed if not any(re.search(p, w) for p in patterns + list(MACHINE_WARNINGS))]
    assert not stray, (f"{block.id} ({block.file}:{block.line}) printed warning(s) the page does not expect (a "
                       f"`warns (REGEX)` directive allows one):\n" + "\n".join(stray))
    missing = [p for p in patterns if not any(re.search(p, w) for w in printed)]
    assert not missing, f"{block.id}: no warning matched `warns ({missing[0]})`; it printed: {printed}"


def test_the_warning_check_refuses_stray_warnings_and_missing_expected_ones():
    """The check itself (review 95: with 256 stand-in examples every loader example printed the
    budget-rounding warning, and no test looked at warnings): a stray warning fails, a ``warns`` directive
    allows its own and requires it, and the machine's warnings pass."""
    rounding = ("/tmp/x/docs_example.py:31: UserWarning: a budget of 0.1 of the 2 full-data steps an epoch "
                "rounds to 1 step an epoch (50% of the data, against the 10% asked for)\n  loader = ...\n")
    machine = ("/venv/torch/utils/data/dataloader.py:665: UserWarning: 'pin_memory' argument is set as true but no "
               "accelerator is found, then device pinned memory won't be used.\n")
    plain = Block("docs/x.md", 1, 10, "x", "pass\n")
    expecting = Block("docs/x.md", 2, 20, "x", "pass\n", [("warns", "(UserWarning: a budget of .* rounds to)")])
    _check_warnings(plain, "")
    _check_warnings(plain, machine + "some other stderr line\n")
    with pytest.raises(AssertionError, match="printed warning"):
        _check_warnings(plain, rounding)
    _check_warnings(expecting, rounding + machine)
    with pytest.raises(AssertionError, match="no warning matched"):
        _check_warnings(expecting, machine)
