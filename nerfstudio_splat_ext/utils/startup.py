"""Start-up cost of every ``ns-*`` command.

nerfstudio 1.1.5 builds a placeholder config for each of its ~30 not-installed external methods when
``nerfstudio.configs.method_configs`` is imported. The placeholder's ``__post_init__`` calls ``inspect.stack()``
only to learn its caller's name; ``inspect.stack`` resolves the source file of every frame, each time scanning all
of ``sys.modules`` (thousands of modules once torch is imported). That costs about 4 s per command (measured on a
2-core CPU with Python 3.11), for ``ns-train``, ``ns-eval`` and ``ns-viewer`` alike.

nerfstudio imports registered plugins before it builds those placeholders, so the plugin can swap the stack walk for
a frame lookup (``sys._getframe``) that gives the same caller name. Behaviour is unchanged: a placeholder built from
the command line (the user asked for a method that is not installed) still prints the install instructions.
"""

from __future__ import annotations

import sys


def skip_external_method_stack_walk() -> bool:
    """Make nerfstudio's external-method placeholders cheap to build. Returns True if applied."""
    try:
        from nerfstudio.configs import external_methods
    except Exception:  # nerfstudio missing or another version: nothing to patch, and the plugin must still import.
        return False
    placeholder = getattr(external_methods, "ExternalMethodDummyTrainerConfig", None)
    original = getattr(placeholder, "__post_init__", None)
    if original is None or getattr(original, "_splat_ext_fast", False):
        return False

    def __post_init__(self) -> None:
        # nerfstudio's check is `inspect.stack()[2].function == "get_external_methods"`, counted from its own
        # __post_init__: frame 1 is the dataclass __init__, frame 2 the code that built the placeholder.
        if sys._getframe(2).f_code.co_name == "get_external_methods":
            return
        original(self)

    __post_init__._splat_ext_fast = True  # type: ignore[attr-defined]
    placeholder.__post_init__ = __post_init__
    return True
