"""Synthetic tool-use environments and tasks (ToolOrchestra's ToolScale recipe), verified by execution.

stages.py runs the pipeline for any backend; procedural.py (with templates.py) and prompts.py (an LLM teacher
through llm.py) are the backends; verify.py replays every task and filters; evolve.py makes tasks harder;
command.py is `orchestra-jax synth`.
"""
