"""The DINO core: the estimator (nidl's API), projection head, loss, schedules, KoleO."""
