//! skiff-agent: the node agent (issue 5).
