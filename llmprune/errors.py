"""The one exception type users see: a one-line message that names the fix."""
import argparse


class LLMPruneError(Exception):
    """Bad input or an unmet requirement. The CLI prints it on one line and exits 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's time limit, a preempted instance's notice), raised by the CLI where the
    program is, so that it stops as after Ctrl-C: an output's temporary folder removed, or kept when it holds a
    checkpoint to go on from, instead of dying with the folder left for the next run to find."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's own refusals (a missing or unknown flag, a bad choice) as every other: one line, exit 2. The
    parsed namespace's `given` names (by dest) the arguments the command line gave, a default never: a flag
    nothing reads in the combination given is refused by what was typed, not by comparing values with defaults."""

    def parse_known_args(self, args=None, namespace=None):
        self._given: set[str] = set()
        ns, rest = super().parse_known_args(args, namespace)
        ns.given = getattr(ns, "given", set()) | self._given  # (a subcommand's parser filled it first)
        return ns, rest

    def _get_values(self, action, arg_strings):
        # argparse calls this for each argument the command line gives (and for no default): the one hook
        # that sees them all, options in groups and BooleanOptionalAction's --no-x included
        self._given.add(action.dest)
        return super()._get_values(action, arg_strings)

    def error(self, message: str):
        self.exit(2, f"llmprune: error: {message}: see `{self.prog} -h`\n")
