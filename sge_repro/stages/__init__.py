"""One function per dvc.yaml stage, named as the stage (`train_cls` -> stages.classification.train_cls;
eval_released is eval_cls at seed 0): (validated Params, ProjectPaths, the stage's item) -> a JSON-able
summary. The only place that maps params.yaml onto the library; the CLI's stage commands are one-liners
over these functions, and tests call them directly.
"""
