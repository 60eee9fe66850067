"""What makes a call dangerous: the rules of check 2, applied to one call at a time.

Each rule names what makes a use harmful, so that ordinary handler code
passes: ``subprocess.run([...])`` is fine, ``subprocess.run(['sh', '-c', ...])``
is a shell; deleting ``/tmp/camera.lock`` is handler work, deleting ``/etc``
is not; a string that says "rm -rf" is only an ``rm -rf`` once it is handed
to something that runs programs. The scanner (``lint``) resolves names; these
functions judge what they resolve to.
"""

from __future__ import annotations

import ast
import posixpath
import re
from typing import Any, List, Optional, Tuple

BLOCKED_CALLS = frozenset({
    "os.system", "os.popen", "os.fork", "os.forkpty",
    "eval", "exec", "compile", "__import__",
    "importlib.import_module", "importlib.__import__",
    "pickle.loads", "pickle.load", "pickle.Unpickler", "_pickle.loads", "_pickle.load", "_pickle.Unpickler",
    "marshal.loads", "marshal.load",
    "subprocess.getoutput", "subprocess.getstatusoutput",
    "asyncio.create_subprocess_shell", "pty.spawn",
    "runpy.run_module", "runpy.run_path",
    "code.interact", "code.InteractiveInterpreter", "code.InteractiveConsole", "code.compile_command",
    "cProfile.run", "cProfile.runctx", "profile.run", "profile.runctx",
})
BLOCKED_PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn")
SHELL_CAPABLE = frozenset({
    "subprocess.run", "subprocess.call", "subprocess.check_call", "subprocess.check_output", "subprocess.Popen",
})
ARGV_RUNNERS = SHELL_CAPABLE | {"asyncio.create_subprocess_exec"}
STRING_RUNNERS = frozenset({"timeit.timeit", "timeit.repeat", "timeit.Timer"})  # run code given as a string
REMOVERS = frozenset({"shutil.rmtree", "os.remove", "os.unlink", "os.rmdir", "os.removedirs"})
TREE_REMOVERS = frozenset({"shutil.rmtree", "os.removedirs"})
ATTRIBUTE_FUNCS = frozenset({"getattr", "setattr", "delattr"})
BUILTIN_NAMES = frozenset({"eval", "exec", "compile", "__import__", "vars"}) | ATTRIBUTE_FUNCS
# Where removing a file harms the system itself; anywhere else (/tmp, /run, /var/lib, a recordings
# folder) deleting files is ordinary handler work.
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/root", "/sbin", "/sys", "/usr")
SCRATCH_DIRS = ("/tmp/", "/run/", "/var/tmp/", "/dev/shm/")
TOP_DIRS = SYSTEM_DIRS + ("/home", "/media", "/mnt", "/opt", "/run", "/srv", "/tmp", "/var")
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "fish", "busybox"})
_INTERPRETER = re.compile(r"^(?:python[\d.]*|perl|ruby|node)$")
_CODE_FLAG = re.compile(r"^-[A-Za-z]*[ce][A-Za-z]*$")  # -c, -lc, -ec; -e for perl, ruby, node
_RM_STRING = re.compile(
    r"(?:^|[\s;&|(`])(?:/usr)?(?:/bin/)?rm\s+(?:-\S+\s+)*?(?:-[a-zA-Z]*[rR][a-zA-Z]*|--recursive)(?:\s|$)"
)


def is_blocked(name: str) -> bool:
    return name in BLOCKED_CALLS or name.startswith(BLOCKED_PREFIXES)


def check_call(scanner: Any, node: ast.Call) -> None:
    """Report what is dangerous about one call (the scanner has resolved the names)."""
    yielded = scanner.resolve(node)  # getattr(os, "system") and the like yield a function
    if yielded is not None and is_blocked(yielded):
        scanner.dangerous(f"{yielded}(", node)
    name = scanner.resolve(node.func) or _methodcaller_target(scanner, node)
    if name is None:
        return
    if is_blocked(name):
        scanner.dangerous(f"{name}(", node)
    elif name in ATTRIBUTE_FUNCS and node.args:
        _check_attribute_func(scanner, name, node)
    elif name == "pkgutil.resolve_name" and not (node.args and _text(node.args[0]) is not None):
        scanner.dangerous("pkgutil.resolve_name(<computed name>)", node)
    elif name in STRING_RUNNERS and _code_as_string(scanner, node):
        scanner.dangerous(f"{name}(<code in a string>)", node)
    elif name in REMOVERS and node.args and harmful_removal(name, _text(node.args[0]) or ""):
        scanner.dangerous(f"{name}({_text(node.args[0])!r})", node)
    elif name == "time.sleep" and scanner.in_async:
        scanner.warn("style", "time.sleep( in an async handler blocks the agent's event loop; use await asyncio.sleep(",
                     node)
    if name in SHELL_CAPABLE and _shell_true(scanner, node):
        scanner.dangerous(f"{name}(shell=True)", node)
    if name in ARGV_RUNNERS:
        runner = _code_runner(scanner, node, name)
        if runner is not None:
            scanner.dangerous(f"{name}([{runner[0]}, {runner[1]!r}, ...])", node)
    if (name in ARGV_RUNNERS or is_blocked(name)) and _rm_in_arguments(scanner, node):
        scanner.dangerous("rm -rf", node)


def _check_attribute_func(scanner: Any, name: str, node: ast.Call) -> None:
    target = scanner.resolve(node.args[0])
    literal = len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
    if name == "setattr" and target == "builtins":
        scanner.dangerous("write to builtins", node)
    elif target is not None and not literal and target.split(".")[0] in scanner.module_roots():
        scanner.dangerous(f"{name}({target}, <computed name>)", node)


def _methodcaller_target(scanner: Any, node: ast.Call) -> Optional[str]:
    """``operator.methodcaller("system", "ls")(os)`` calls ``os.system``."""
    caller = node.func
    if (isinstance(caller, ast.Call) and scanner.resolve(caller.func) == "operator.methodcaller"
            and caller.args and _text(caller.args[0]) is not None and node.args):
        base = scanner.resolve(node.args[0])
        return f"{base}.{_text(caller.args[0])}" if base else None
    return None


def _text(node: ast.AST) -> Optional[str]:
    """The string a literal holds, or None for anything else."""
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _truthy(node: ast.AST) -> bool:
    return not (isinstance(node, ast.Constant) and not node.value)


def _shell_true(scanner: Any, node: ast.Call) -> bool:
    """``shell=`` anything but a false literal, also through ``**{"shell": True}`` or ``**options``."""
    for keyword in node.keywords:
        if keyword.arg == "shell":
            return _truthy(keyword.value)
        if keyword.arg is None and carries_shell(keyword.value, scanner.shell_kwargs):
            return True
    return False


def carries_shell(value: ast.AST, shell_names: Any) -> bool:
    """A dict expression that sets ``shell`` to something true."""
    if isinstance(value, ast.Dict):
        return any(k is not None and _text(k) == "shell" and _truthy(v) for k, v in zip(value.keys, value.values))
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "dict":
        return any(k.arg == "shell" and _truthy(k.value) for k in value.keywords)
    return isinstance(value, ast.Name) and value.id in shell_names


def _code_runner(scanner: Any, node: ast.Call, name: str) -> Optional[Tuple[str, str]]:
    """``(program, flag)`` when the argument list starts a shell or interpreter on a string of code."""
    if name == "asyncio.create_subprocess_exec":
        argv: List[ast.AST] = list(node.args)
    else:
        first = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "args"), None)
        argv = list(first.elts) if isinstance(first, (ast.List, ast.Tuple)) else []
    words = [_word(scanner, element) for element in argv]
    while words and words[0] is not None and (posixpath.basename(words[0]) == "env" or "=" in words[0]):
        words.pop(0)  # env VAR=value sh -c ...
    if not words or words[0] is None or not runs_code(words[0]):
        return None
    flag = next((w for w in words[1:3] if w is not None and code_flag(w)), None)
    if flag is None:
        return None
    program = "sys.executable" if words[0] == _EXECUTABLE else repr(words[0])
    return program, flag


_EXECUTABLE = "\0sys.executable"  # stands for the interpreter itself among argument words


def _word(scanner: Any, node: ast.AST) -> Optional[str]:
    text = _text(node)
    if text is not None:
        return text
    return _EXECUTABLE if scanner.resolve(node) == "sys.executable" else None


def runs_code(program: str) -> bool:
    """A shell or an interpreter: given a code flag (-c, -e), it runs a string as a program."""
    if program == _EXECUTABLE:
        return True
    base = posixpath.basename(program)
    return base in SHELLS or bool(_INTERPRETER.match(base))


def code_flag(word: str) -> bool:
    return bool(_CODE_FLAG.match(word))


def _code_as_string(scanner: Any, node: ast.Call) -> bool:
    """``timeit`` given its statement (or setup) as code in a string, not as a callable."""
    values = list(node.args[:2]) + [k.value for k in node.keywords if k.arg in ("stmt", "setup")]
    return any(_text(v) is not None or isinstance(v, (ast.JoinedStr, ast.BinOp))
               or (isinstance(v, ast.Name) and v.id in scanner.strings) for v in values)


def _rm_in_arguments(scanner: Any, node: ast.Call) -> bool:
    """An ``rm -r`` in a string handed to something that runs programs, directly or through a variable."""
    for argument in list(node.args) + [k.value for k in node.keywords]:
        for part in ast.walk(argument):
            text = _text(part)
            if text is not None and is_rm_string(text):
                return True
            if isinstance(part, ast.Name) and any(is_rm_string(text) for text in scanner.strings.get(part.id, ())):
                return True
    return False


def is_rm_string(text: str) -> bool:
    return bool(_RM_STRING.search(text))


def harmful_removal(name: str, path: str) -> bool:
    """Whether removing ``path`` with ``name`` harms the system (not a handler's own files)."""
    if not path.startswith("/"):
        return False
    path = posixpath.normpath(path)
    if path == "/" or path in TOP_DIRS:
        return True
    if path.startswith(tuple(folder + "/" for folder in SYSTEM_DIRS)):
        return True
    # A whole tree near the top (/home/pi, /var/lib) is the system's, not a handler's; scratch is anyone's.
    return name in TREE_REMOVERS and path.count("/") <= 2 and not path.startswith(SCRATCH_DIRS)
