"""SafeEdit benchmark for editkit: dataset, judge, metrics, runner and report."""
