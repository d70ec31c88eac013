"""The send path's policy, free of I/O: the pipeline of one account's lane, the lanes' policies,
batching, the in-flight limit, the shared rate limit and the retry schedule."""
