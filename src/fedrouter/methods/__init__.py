"""Federated methods, each one module with a server part and a client part (variants share a module).

The registry below names them. A method module declares its options as `OPTIONS` (name -> default) and,
where a value needs more than its type, a `check_options(name, options)` that raises one clear error;
`options_for` is the one place options are read: unknown names, wrong types and the module's own checks,
with the registry supplying the method's name for the messages. The config validates them this way before
any work, and the parts get the completed dict in `MethodSetup.options`.

A method's server part declares its facts (`base.MethodFacts`) as `FACTS`; `facts_of` is where the layers
above read them.
"""

from __future__ import annotations

import importlib
import math

from fedrouter.errors import FedrouterError
from fedrouter.methods.facts import MethodFacts

# name -> (module under fedrouter.methods, server part class, client part class)
METHODS = {
    "fedit": ("fedit", "Server", "Client"),
    "local": ("local", "Server", "Client"),
    "fedprox": ("fedprox", "Server", "Client"),
    "fedsa": ("fedsa", "Server", "Client"),
    "ffa": ("ffa", "Server", "Client"),
    "fedcluster": ("fedcluster", "Server", "Client"),
    "ifca": ("ifca", "Server", "Client"),
    "feddpa": ("feddpa", "Server", "Client"),
    "flora": ("flora", "Server", "Client"),
    "flexlora": ("flexlora", "Server", "Client"),
    "hetlora": ("hetlora", "Server", "Client"),
    "fedex": ("fedex", "Server", "Client"),
    "fedlease": ("fedlease", "Server", "Client"),
    "fedalt": ("fedalt", "Server", "Client"),
    "fedrouter": ("fedrouter", "Server", "Client"),
    "fedrouter-star": ("fedrouter", "StarServer", "Client"),
    "fedrouter-oracle": ("fedrouter", "OracleServer", "Client"),
}


DEFAULT = "fedrouter"  # the method a config without one runs
QUICK = ("fedrouter", "fedit", "local")  # what `fedrouter compare` compares when given no --methods


def _module(name: str):
    return importlib.import_module(f"fedrouter.methods.{METHODS[name][0]}")


def load_method(name: str):
    """(ServerClass, ClientClass) of the method registered as `name`."""
    _, server, client = METHODS[name]
    module = _module(name)
    return getattr(module, server), getattr(module, client)


NO_FACTS = MethodFacts(adapters="?")  # what a reader of old run directories assumes of a method it does not know


def facts_of(name: str, default: MethodFacts | None = None) -> MethodFacts:
    """The facts the method registered as `name` declares (its server part's `FACTS`). For a name that is
    not registered (a run directory of another version), `default` if given, else KeyError."""
    if name not in METHODS:
        if default is None:
            raise KeyError(name)
        return default
    server, _ = load_method(name)
    facts = getattr(server, "FACTS", None)
    if not isinstance(facts, MethodFacts):
        raise TypeError(f"method {name}: its server part {server.__qualname__} declares no FACTS (methods.base.MethodFacts)")
    return facts


def _kind_ok(value, default) -> bool:
    if default is None:  # anything; the module's check_options decides
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, type(default)) and not isinstance(value, bool)


def options_for(name: str, options: dict, privacy: dict | None = None) -> dict:
    """`options` over the method's declared defaults, each checked: unknown names, values of the wrong
    kind (a float option takes an int; bools are never numbers) and the module's own rules -- with the
    run's `privacy` section (when on), also what the module allows under DP (`check_privacy`)."""
    module = _module(name)
    defaults = module.OPTIONS
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        known = ", ".join(defaults) or "none"
        raise FedrouterError(f"{name}: unknown method option(s) {', '.join(unknown)}; known: {known}")
    out = {**defaults, **options}
    loose = getattr(module, "LOOSE", set())  # options of more than one kind ("auto" or a number)
    for key, default in defaults.items():
        if key not in loose and not _kind_ok(out[key], default):
            kind = {bool: "true or false", float: "a finite number", int: "an integer", str: "a string"}.get(
                type(default), type(default).__name__)
            raise FedrouterError(f"{name}: option {key} must be {kind}, got {out[key]!r}")
    check = getattr(module, "check_options", None)
    if check is not None:
        check(name, out)
    check_privacy = getattr(module, "check_privacy", None)
    if privacy and check_privacy is not None:
        check_privacy(name, out, privacy)
    return out
