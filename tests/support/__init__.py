"""What the fixture modules and the tests share: free ports, subprocesses started and stopped, servers in a thread."""
