__version__ = "0.1.0.dev0"


def git_sha() -> str:
    """The commit results are recorded against: DUALPATH_GIT_SHA when set (a copied tree, e.g.
    on the GPU host, may carry no or a stale .git), else the checkout's HEAD, else 'unknown'."""
    import os
    import subprocess

    from dualpath import env

    if env.GIT_SHA.get():
        return env.GIT_SHA.get()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                             capture_output=True, text=True).stdout.strip()
    except OSError:
        out = ""
    return out or "unknown"
