"""Benchmarks (filled in below)."""
import argparse


def add_parser(b: argparse.ArgumentParser) -> None:
    pass


def main(a) -> int:
    return 0
