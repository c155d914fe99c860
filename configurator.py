"""
nanoGPT-style configuration: a script's module-level globals are its config, and

    python train_stage1.py config/tiny_cpu.py --batch_size=8 --aux=False

first executes the config file(s) in order, then applies each --key=value. A key the script does
not define, or a value whose type differs from the default's, stops the run before any work
happens. Values are parsed with ast.literal_eval, so --lr=3e-4, --aux=False and --name=foo all work.

Use it from a script, after the config globals are defined:

    config = configure(globals())
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


def configure(g, argv=None):
    """Apply config files and --key=value overrides in argv to the dict g (a module's globals).
    Returns the resulting config as a plain dict of the overridable keys."""
    argv = sys.argv[1:] if argv is None else argv
    keys = {k for k, v in g.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}
    if any(a in ("-h", "--help") for a in argv):
        doc = (g.get("__doc__") or "").strip()
        print(doc + "\n\nconfig keys (override with --key=value, or pass a config/*.py file):")
        for k in sorted(keys):
            print(f"  --{k}={g[k]!r}")
        raise SystemExit(0)
    for arg in argv:
        if not arg.startswith("--"):
            try:
                src = open(arg).read()
            except OSError as e:
                raise SystemExit(f"config error: cannot read config file {arg}: {e.strerror}")
            file_globals = {}
            exec(compile(src, arg, "exec"), file_globals)
            for k, v in file_globals.items():
                if k.startswith("_") or k in ("__builtins__",):
                    continue
                if k not in keys:
                    raise SystemExit(f"config error: {arg} sets unknown key '{k}'")
                g[k] = _coerce(k, v, g[k], f"{arg}: {k}")
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

