"""The lint (check 2): every dangerous spelling refused, every ordinary one accepted; no sockets.

A new case is one line in one of the two tables. Refusals must keep the
seed's message (``Dangerous pattern detected: ...``) and give a line number.
"""

import pytest

from agent.checks import check_code

DANGEROUS = {
    "os.system": "import os\nos.system('ls')\n",
    "import alias": "import os as o\no.system('ls')\n",
    "from import alias": "from os import system as s\ns('ls')\n",
    "rebinding": "import os\nrun = os.system\nrun('ls')\n",
    "os.popen": "import os\nos.popen('ls')\n",
    "os.exec": "import os\nos.execv('/bin/ls', ['ls'])\n",
    "os.spawn": "from os import spawnlp\nspawnlp(0, 'ls', 'ls')\n",
    "shell=True": "import subprocess\nsubprocess.run('ls', shell=True)\n",
    "Popen shell=True": "from subprocess import Popen\nPopen('ls', shell=1)\n",
    "getoutput": "import subprocess\nsubprocess.getoutput('ls')\n",
    "eval": "eval('1 + 1')\n",
    "exec": "exec('x = 1')\n",
    "compile": "compile('1', 'f', 'eval')\n",
    "__import__": "__import__('os')\n",
    "import_module": "import importlib\nimportlib.import_module('o' + 's')\n",
    "import_module from": "from importlib import import_module as im\nim('os')\n",
    "getattr computed": "import os\nname = 'sys' + 'tem'\ngetattr(os, name)('ls')\n",
    "getattr literal": "import os\ngetattr(os, 'system')('ls')\n",
    "rmtree root": "import shutil\nshutil.rmtree('/')\n",
    "os.remove rooted": "import os\nos.remove('/etc/passwd')\n",
    "rm -rf list": "import subprocess\nsubprocess.run(['rm', '-rf', '/home/pi'])\n",
    "rm -r string": "import subprocess\ncmd = 'rm -r /home/pi/recordings'\nsubprocess.run(cmd.split())\n",
    "pickle.loads": "import pickle\npickle.loads(b'x')\n",
    "ctypes": "import ctypes\n",
    "builtins write": "import builtins\nbuiltins.print = None\n",
    "__builtins__ write": "__builtins__['open'] = None\n",
    "setattr builtins": "import builtins\nsetattr(builtins, 'open', None)\n",
    "passed as callback": "import os, threading\nthreading.Thread(target=os.system, args=('ls',))\n",
    "shell subprocess": "import asyncio\nasyncio.create_subprocess_shell('ls')\n",
    # Ways to run a shell without shell=True
    "sh -c in a list": "import subprocess\nsubprocess.run(['sh', '-c', 'ls'])\n",
    "bash -c in a list": "import subprocess\nsubprocess.run(['bash', '-c', 'ls'])\n",
    "/bin/sh -c in a tuple": "import subprocess\nsubprocess.Popen(('/bin/sh', '-c', 'ls'))\n",
    "dash -ec": "import subprocess\nsubprocess.call(['dash', '-ec', 'ls'])\n",
    "env bash -lc": "import subprocess\nsubprocess.run(['/usr/bin/env', 'bash', '-lc', 'ls'])\n",
    "sys.executable -c": "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'print(1)'])\n",
    "python3 -c": "import subprocess\nsubprocess.check_output(['python3', '-c', 'print(1)'])\n",
    "perl -e": "import subprocess\nsubprocess.run(['perl', '-e', 'print 1'])\n",
    "args= keyword": "import subprocess\nsubprocess.run(args=['sh', '-c', 'ls'])\n",
    "create_subprocess_exec sh -c": "import asyncio\nasync def f():\n    await asyncio.create_subprocess_exec('sh', '-c', 'ls')\n",
    "shell=True in **{...}": "import subprocess\nsubprocess.run('ls', **{'shell': True})\n",
    "shell=True in **options": "import subprocess\nopts = {'shell': True}\nsubprocess.run('ls', **opts)\n",
    "shell=True in **dict(...)": "import subprocess\nopts = dict(shell=True)\nsubprocess.check_output('ls', **opts)\n",
    "options['shell'] = True": "import subprocess\nopts = {}\nopts['shell'] = True\nsubprocess.run('ls', **opts)\n",
    "options.update(shell=True)": "import subprocess\nopts = {}\nopts.update(shell=True)\nsubprocess.run('ls', **opts)\n",
    # Ways to reach a module's function by name
    "sys.modules['os']": "import sys\nsys.modules['os'].system('ls')\n",
    "sys.modules.get('os')": "import sys\nsys.modules.get('os').system('ls')\n",
    "vars(os)": "import os\nvars(os)['system']('ls')\n",
    "os.__dict__": "import os\nos.__dict__['system']('ls')\n",
    "os.__dict__.get": "import os\nos.__dict__.get('system')('ls')\n",
    "re-bound module": "import os\no = os\no.system('ls')\n",
    "re-bound twice": "import os\na = os\nb = a\nb.popen('ls')\n",
    "operator.attrgetter": "import operator, os\noperator.attrgetter('system')(os)('ls')\n",
    "operator.methodcaller": "import operator, os\noperator.methodcaller('system', 'ls')(os)\n",
    "pkgutil.resolve_name": "import pkgutil\npkgutil.resolve_name('os.system')('ls')\n",
    "pkgutil.resolve_name with ':'": "import pkgutil\npkgutil.resolve_name('os:system')('ls')\n",
    "pkgutil.resolve_name computed": "import pkgutil\nname = 'o' + 's.system'\npkgutil.resolve_name(name)\n",
    "getattr kept for later": "import os\nrun = getattr(os, 'system')\n",
    # Ways to run code that is data
    "runpy.run_path": "import runpy\nrunpy.run_path('/tmp/x.py')\n",
    "runpy.run_module": "from runpy import run_module\nrun_module('x')\n",
    "code.InteractiveInterpreter": "import code\ncode.InteractiveInterpreter().runsource('1')\n",
    "code.InteractiveConsole": "from code import InteractiveConsole\nInteractiveConsole().push('1')\n",
    "marshal.loads": "import marshal\nmarshal.loads(b'')\n",
    "pickle.Unpickler": "import pickle, io\npickle.Unpickler(io.BytesIO(b'')).load()\n",
    "timeit with a string": "import timeit\ntimeit.timeit('import os')\n",
    "timeit.Timer stmt=": "import timeit\ntimeit.Timer(stmt='x = 1').timeit()\n",
    "timeit setup string": "import timeit\ntimeit.repeat(lambda: 1, setup='import os')\n",
    "cProfile.run": "import cProfile\ncProfile.run('import os')\n",
    "profile.runctx": "import profile\nprofile.runctx('x', {}, {})\n",
    # Deletes that harm the system
    "rmtree of a top folder": "import shutil\nshutil.rmtree('/home')\n",
    "rmtree of a home": "import shutil\nshutil.rmtree('/home/pi')\n",
    "remove under /boot": "import os\nos.unlink('/boot/config.txt')\n",
    "rmtree with ..": "import shutil\nshutil.rmtree('/tmp/../etc')\n",
    "rm -rf through a variable": "import subprocess\nwipe = 'rm -rf /var/lib'\nsubprocess.run(wipe, shell=False)\n",
}


ALLOWED = {
    "Popen with a list": "import subprocess\ndef start():\n    return subprocess.Popen(['raspivid', '-o', 'x.h264'])\n",
    "run with a list": "import subprocess\ndef ls():\n    subprocess.run(['ls', '-l'], shell=False, check=False)\n",
    "mentions in comment and string": "# never call os.system('x')\nNOTE = 'os.system( is refused'\n",
    "docstring mentions rm -rf": '"""Do not rm -rf anything."""\n',
    "re.compile": "import re\nPATTERN = re.compile('a+')\n",
    "getattr on data": "def f(obj, key):\n    return getattr(obj, key)\n",
    "rm of a single file": "import subprocess\ndef clean():\n    subprocess.run(['rm', '/tmp/x.h264'])\n",
    "optional import": "try:\n    import picamera2_not_here\nexcept ImportError:\n    picamera2_not_here = None\n",
    # False alarms the earlier rules raised, and more of their kind
    "unlink a lock under /tmp": "import os\nos.unlink('/tmp/camera.lock')\n",
    "remove a pid file under /run": "import os\nos.remove('/run/pi-cam.pid')\n",
    "remove a recording under /var/lib": "import os\nos.remove('/var/lib/pi-agent/recordings/old.h264')\n",
    "rmtree a day of recordings": "import shutil\nshutil.rmtree('/home/pi/recordings/2026-11-01')\n",
    "rmtree a scratch folder": "import shutil\nshutil.rmtree('/tmp/pi-cam-frames')\n",
    "relative delete": "import os\nos.remove('frame.jpg')\n",
    "log message says rm -rf": "import logging\nlogging.getLogger(__name__).warning('never run rm -rf on the card')\n",
    "help text says rm -r": "HELP = 'to start over: rm -r ~/recordings'\n",
    "parameter named exec": "def handle_run(data, exec=None):\n    return {'x': exec}\n",
    "parameter named eval, called": "def apply(eval, x):\n    return eval(x)\n",
    "local named compile": "def f():\n    compile = str.upper\n    return compile('x')\n",
    "module function named exec": "def exec(job):\n    return job\nexec(1)\n",
    "method named exec": "def f(cursor):\n    cursor.exec('SELECT 1')\n",
    "vars of data": "def f(obj):\n    return vars(obj)\n",
    "timeit a callable": "import timeit\ntimeit.timeit(lambda: 1, number=1)\n",
    "sh running a script": "import subprocess\nsubprocess.run(['sh', '/opt/cam/start.sh'])\n",
    "python running a script": "import subprocess, sys\nsubprocess.run([sys.executable, '/opt/cam/x.py'])\n",
    "grep -c is not sh -c": "import subprocess\nsubprocess.run(['grep', '-c', 'x', '/tmp/log'])\n",
    "shell=False in **{...}": "import subprocess\nsubprocess.run(['ls'], **{'shell': False})\n",
    "sys.modules lookup of json": "import sys\nsys.modules['json'].dumps({})\n",
    "getattr on an import with a literal": "import os\nsep = getattr(os, 'sep')\n",
}


@pytest.mark.parametrize("source", DANGEROUS.values(), ids=DANGEROUS.keys())
def test_every_dangerous_spelling_is_refused_with_its_line(source):
    report = check_code(source, "handlers/risky.py")
    assert not report.valid
    first = report.errors[0]
    assert first.message.startswith("Dangerous pattern detected: ") and first.line, first


@pytest.mark.parametrize("source", ALLOWED.values(), ids=ALLOWED.keys())
def test_ordinary_code_passes(source):
    report = check_code(source, "handlers/fine.py")
    assert report.valid, [issue.text() for issue in report.errors]


def test_a_shell_in_a_list_names_the_program_and_its_flag():
    report = check_code("import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'x'])\n", "x.py")
    assert report.errors[0].text() == "Dangerous pattern detected: subprocess.run([sys.executable, '-c', ...]) (line 2)"
