"""Exit codes scripts can act on (documented in the README)."""

OK = 0  # nothing wrong (warnings and orphans allowed)
FINDINGS = 1  # error findings / something to act on
USAGE = 2  # bad command line
CANNOT_RUN = 3  # not a registry root, registry running, lock held, damage blocks gc
INTERRUPTED = 130  # Ctrl-C: stopped at a safe point
