"""Command-line utilities: conversion, label making, dataset checks, benchmarks, demo data."""
