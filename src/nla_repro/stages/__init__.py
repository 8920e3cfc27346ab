"""One short module per stage, each `run(params)` called by `python -m nla_repro <stage>`."""
