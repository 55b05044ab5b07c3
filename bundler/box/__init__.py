"""The box side: what `./install.sh` runs from the verified bundle, one module per step.

    options → verify → trust → preflight → plan → release → service → health/smoke → switch
    lifecycle: install (first or upgrade), rollback, uninstall

Each step takes only what it needs and returns data the next one uses; `lifecycle`
wires them in the order above. Nothing under the prefix changes before the whole
bundle has been verified. Runs on Python 3.9+, the standard library plus jinja2,
tqdm and PyPA's `installer` (imported from the bundle's own wheels).
"""
