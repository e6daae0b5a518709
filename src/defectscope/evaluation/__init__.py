"""Measuring a method on a dataset: the evaluation protocols and the HTML report."""
