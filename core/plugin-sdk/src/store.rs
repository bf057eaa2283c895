//! Configuration backup stores: blocking, called off the request path.

use crate::api::abi_stable::std_types::{ROption, RResult, RSlice, RStr, RVec};
use crate::api::{self, PluginError, StoredGeneration};
use crate::{guard, Error};

/// A backup store keeps generations of the gateway's configuration, per scope (gateway id).
/// Every call may block; the gateway makes them from a blocking thread.
pub trait Store: Send + Sync + Sized + 'static {
    /// The store's configuration (the manifest entry's `config`), parsed strictly.
    type Config: serde::de::DeserializeOwned;

    /// Builds the store; an error stops the gateway from starting.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// Saves a generation atomically (all of it or nothing, even after a crash).
    fn save(&self, scope: &str, generation: u64, data: &[u8]) -> Result<(), Error>;

    /// Reads a generation (`None` when absent).
    fn load(&self, scope: &str, generation: u64) -> Result<Option<Vec<u8>>, Error>;

    /// The stored generations, newest first.
    fn list(&self, scope: &str) -> Result<Vec<StoredGeneration>, Error>;

    /// Keeps the newest `keep` generations; answers how many were removed.
    fn prune(&self, scope: &str, keep: u32) -> Result<u32, Error>;
}

pub(crate) struct Adapter<S>(pub(crate) S);

impl<S: Store> api::BackupStore for Adapter<S> {
    fn save(
        &self,
        scope: RStr<'_>,
        generation: u64,
        data: RSlice<'_, u8>,
    ) -> RResult<(), PluginError> {
        guard(|| self.0.save(scope.as_str(), generation, data.as_slice()))
    }

    fn load(&self, scope: RStr<'_>, generation: u64) -> RResult<ROption<RVec<u8>>, PluginError> {
        guard(|| {
            self.0
                .load(scope.as_str(), generation)
                .map(|v| v.map(RVec::from).into())
        })
    }

    fn list(&self, scope: RStr<'_>) -> RResult<RVec<StoredGeneration>, PluginError> {
        guard(|| self.0.list(scope.as_str()).map(RVec::from))
    }

    fn prune(&self, scope: RStr<'_>, keep: u32) -> RResult<u32, PluginError> {
        guard(|| self.0.prune(scope.as_str(), keep))
    }
}
