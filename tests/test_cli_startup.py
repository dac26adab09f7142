"""Start-up cost: `tcu-agent run` imports what running needs before it is ready, not the other
commands, the simulator, the cloud side or the optional services, and builds the agent with
the collector off (frozen, then on again); the parser of one command parses like the full one."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT
from test_cli import assert_one_line_error, cli

# Never imported before "ready" by an agent without [mqtt], [commands], campaigns, updates,
# diagnostics, TUF, PKCS#11 or a simulator.
NOT_BEFORE_READY = (
    "agent.cli.replay", "agent.cli.demo", "agent.cli.diag", "agent.cli.dbc", "agent.cli.keys",
    "agent.cli.verify", "agent.cli.simulate", "agent.cli.modem", "agent.cli.update",
    "agent.cli.monitor", "agent.cli.status", "agent.sim", "agent.cloud", "agent.adapters.canlog",
    "agent.adapters.tuf", "agent.adapters.pkcs11", "agent.adapters.diag", "agent.core.campaigns",
    "agent.core.campaignengine", "agent.core.campaigncode", "agent.core.windows",
    "agent.core.executor", "agent.app.commandservice", "agent.app.updateservice",
    "agent.app.diagservice", "agent.core.updates", "agent.core.updatemachine", "paho", "tuf",
    "pkcs11")
# The agent as `tcu-agent run` starts it, with a log handler that, on the "running:" line (the
# one READY=1 goes with), writes to stdout the modules imported so far and the collector's state.
WATCH = """
import gc, json, logging, sys
class Ready(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("running: vin"):
            print(json.dumps({"modules": sorted(sys.modules), "gc_enabled": gc.isenabled(),
                              "frozen": gc.get_freeze_count()}), flush=True)
logging.getLogger("agent.app.runtime").addHandler(Ready())
from agent.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def at_ready(config) -> dict:
    """What a real `tcu-agent run` process had imported when it was ready, and its collector."""
    proc = subprocess.Popen([sys.executable, "-c", WATCH, "run", "-c", str(config)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the agent runs until terminated
        assert line, f"the agent exited ({proc.wait()}) before it was ready: {proc.stderr.read()}"
        return json.loads(line)
    finally:
        proc.terminate()
        proc.wait(15)


def test_run_imports_only_what_running_needs_before_ready(test_dbc, tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[vehicle]
vin = "VIN0001"
[[bus]]
name = "pt"
interface = "virtual"
channel = "startup-{tmp_path.name}"
dbc = ["{test_dbc}"]
[storage]
dir = "{tmp_path / 'state'}"
[telemetry]
messages = ["*"]
""")
    ready = at_ready(config)
    names = ready["modules"]
    # The scan sees the imports that matter (or the check below would prove nothing).
    assert {"agent.cli.run", "agent.app.runtime", "agent.adapters.canbus", "can",
            "cantools"} <= set(names), names
    early = [n for n in names if any(n == m or n.startswith(m + ".") for m in NOT_BEFORE_READY)]
    assert not early, early
    # Built with the collector off: what was built is frozen, and the collector is back on.
    assert ready["gc_enabled"] and ready["frozen"] > 10_000, ready["frozen"]


def test_the_top_level_help_still_lists_every_command():
    from agent.cli.main import COMMANDS

    out = cli("--help", check=True).stdout
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ")
              and not line.startswith("     ")]
    assert listed == COMMANDS, out
    # help or an option only the full parser knows, before the command: the full parser
    assert "usage: tcu-agent [-h]" in cli("-h", "run", check=True).stdout
    assert cli("--version", "run", check=True).stdout.startswith("tcu-agent ")


def test_one_commands_parser_parses_like_the_full_one(tmp_path):
    assert_one_line_error(cli("run"), "the following arguments are required: -c/--config")
    assert_one_line_error(cli("--log-level", "debug", "run", "--nope", "-c", "x"),
                          "unrecognized arguments: --nope")
    assert_one_line_error(cli("--log-level", "loud", "run", "-c", "x"),
                          "argument --log-level: invalid choice: 'loud'")
    assert_one_line_error(cli("runn", "-c", "x"), "invalid choice: 'runn'", "'run'", "'status'")
    assert_one_line_error(cli("--log-level=info", "run", "-c", tmp_path / "none.toml"),
                          "none.toml: no such config file")
