"""One function per dvc.yaml stage: (validated params, paths, matrix item) -> result.

This package is the only place that maps params.yaml onto the library. The CLI's stage commands
are one-liners over these functions; tests call them directly. Each function takes the typed
`Params` (validated once, in `sge_repro.params`), the `ProjectPaths` of the project, and the
stage's matrix item (model / detector / backbone / seed), and returns a JSON-able summary.

    data       -> stages.data.data
    train_cls  -> stages.classification.train_cls      eval_cls -> stages.classification.eval_cls
    convert    -> stages.detection.convert
    train_det  -> stages.detection.train_det           eval_det -> stages.detection.eval_det
    visualize  -> stages.report.visualize              report   -> stages.report.report
"""
