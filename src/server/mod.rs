//! Vice: the file server. (being written)
