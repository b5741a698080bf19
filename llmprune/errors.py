"""The one exception type users see: a one-line message that names the fix."""
import argparse


class LLMPruneError(Exception):
    """Bad input or an unmet requirement. The CLI prints it on one line and exits 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's time limit, a preempted instance's notice), raised by the CLI where the
    program is, so that it stops as after Ctrl-C: an output's temporary folder removed, or kept when it holds a
    checkpoint to go on from, instead of dying with the folder left for the next run to find."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's own refusals (a missing or unknown flag, a bad choice) as every other: one line, exit 2."""

    def error(self, message: str):
        self.exit(2, f"llmprune: error: {message}: see `{self.prog} -h`\n")
