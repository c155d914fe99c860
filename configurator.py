"""
nanoGPT-style configuration: a script's module-level globals are its config, and

    python train_stage1.py config/tiny_cpu.py --batch_size=8 --aux=False

first executes the config file(s) in order, then applies each --key=value. The config is the
script's lowercase globals of simple types (UPPERCASE constants are not config). A key the script does
not define, or a value whose type differs from the default's, stops the run before any work
happens. Values are parsed with ast.literal_eval, so --lr=3e-4, --aux=False and --name=foo all work.

Use it from a script, after the config globals are defined:

    config = configure(globals(), section="stage1")

A config file is plain Python assignments. Top-level names set the running script's keys; a
dict named after a script's section (data, tokenizer, vqgan, stage1, stage2, rl, eval, and learn
for `python bench.py learn`) sets that
script's keys and is ignored by the others, so one preset file can configure the whole pipeline:

    _data_dir = "data/tiny"                     # "_" names are the file's own helpers
    vqgan = dict(data_dir=_data_dir, max_iters=1500)
    stage1 = dict(data_dir=_data_dir, batch_size=16)
"""
import ast
import sys


def _coerce(key, value, default, where):
    """Return value if it has the default's type (an int is accepted for a float), else stop."""
    if default is None or value is None:
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)  # --lr=1 means 1.0
    if type(value) is not type(default):
        raise SystemExit(f"config error: {where}: expected {type(default).__name__}, got {type(value).__name__} {value!r}")
    return value


def _literal(raw):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word such as --init_from=resume is a string


# A pipeline preset (config/tiny_cpu.py) configures every script at once: one dict per script,
# named by its section. Names starting with "_" are the file's own helpers.
SECTIONS = ("data", "tokenizer", "vqgan", "stage1", "stage2", "rl", "eval", "learn")


def _file_settings(path, section):
    """(key, value, where) for the settings of a config file that apply to `section`."""
    try:
        src = open(path).read()
    except OSError as e:
        raise SystemExit(f"config error: cannot read config file {path}: {e.strerror}")
    file_globals = {}
    exec(compile(src, path, "exec"), file_globals)
    out = []
    for k, v in file_globals.items():
        if k.startswith("_"):
            continue
        if k in SECTIONS and isinstance(v, dict):
            if k == section:
                out += [(kk, vv, f"{path} [{k}]") for kk, vv in v.items()]
        else:
            out.append((k, v, path))
    return out


def configure(g, section=None, argv=None):
    """Apply config files and --key=value overrides in argv to the dict g (a module's globals).
    `section` names the script within a preset (see the module docstring). Returns the resulting
    config as a plain dict of the overridable keys."""
    argv = sys.argv[1:] if argv is None else argv
    # config = the lowercase globals of simple types; UPPERCASE module constants are not config
    keys = {k for k, v in g.items() if not k.startswith("_") and k == k.lower()
            and isinstance(v, (int, float, bool, str, tuple, list, dict, type(None)))}
    if any(a in ("-h", "--help") for a in argv):
        doc = (g.get("__doc__") or "").strip()
        print(doc + "\n\nconfig keys (override with --key=value, or pass a config/*.py file):")
        for k in sorted(keys):
            print(f"  --{k}={g[k]!r}")
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith("--"):
            for k, v, where in _file_settings(arg, section):
                if k not in keys:
                    raise SystemExit(f"config error: {where} sets unknown key '{k}'")
                g[k] = _coerce(k, v, g[k], f"{where}: {k}")
        else:
            if "=" not in arg:
                raise SystemExit(f"config error: expected --key=value, got '{arg}'")
            k, raw = arg[2:].split("=", 1)
            if k not in keys:
                close = [c for c in sorted(keys) if c.startswith(k[:3])]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise SystemExit(f"config error: unknown config key '{k}'{hint}")
            g[k] = _coerce(k, _literal(raw), g[k], f"--{k}={raw}")
    return {k: g[k] for k in sorted(keys)}
