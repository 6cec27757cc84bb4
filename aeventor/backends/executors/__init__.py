"""Executors: how a claimed step run is carried out (a local process or command, an in-loop
coroutine, a process on an SSH host). Light on purpose: the step runner lives here.
"""
