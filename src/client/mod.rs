//! Venus: the client cache manager. (being written)
