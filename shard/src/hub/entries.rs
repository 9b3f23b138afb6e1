//! A symbol's subscriptions: a vector the fan-out walks, and an index by
//! `(sink id, channel)`, so that a subscribe, an unsubscribe or a repair
//! costs the same however many others the symbol has (a client cannot make
//! its requests dearer by the others' subscriptions, and a reconnect storm
//! of N clients costs N, not N²).

use std::collections::HashMap;

use super::{Channel, Entry};

#[derive(Default)]
pub(super) struct Entries {
    list: Vec<Entry>,
    /// Where each subscription is in `list`.
    index: HashMap<(u64, Channel), usize>,
}

impl Entries {
    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Entry> {
        self.list.iter()
    }

    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, Entry> {
        self.list.iter_mut()
    }

    pub fn find(&mut self, sink_id: u64, channel: Channel) -> Option<&mut Entry> {
        let i = *self.index.get(&(sink_id, channel))?;
        self.list.get_mut(i)
    }

    /// Adds `e`, in place of the same sink's subscription of the channel.
    pub fn put(&mut self, e: Entry) {
        match self.index.get(&(e.sink_id, e.channel)) {
            Some(&i) => self.list[i] = e,
            None => {
                self.index.insert((e.sink_id, e.channel), self.list.len());
                self.list.push(e);
            }
        }
    }

    pub fn remove(&mut self, sink_id: u64, channel: Channel) {
        if let Some(i) = self.index.remove(&(sink_id, channel)) {
            self.take_out(i);
        }
    }

    /// Removes the entries marked gone.
    pub fn remove_gone(&mut self) {
        let mut i = 0;
        while i < self.list.len() {
            if self.list[i].gone {
                self.index.remove(&(self.list[i].sink_id, self.list[i].channel));
                self.take_out(i);
            } else {
                i += 1;
            }
        }
    }

    /// Swap-removes `list[i]` (its index entry already gone) and moves the
    /// index of the entry that took its place.
    fn take_out(&mut self, i: usize) {
        self.list.swap_remove(i);
        if let Some(moved) = self.list.get(i) {
            self.index.insert((moved.sink_id, moved.channel), i);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use proptest::prelude::*;

    use super::*;
    use crate::{
        domain::Interval,
        hub::{Data, Offer, Push, Sink},
    };

    struct Nobody;
    impl Sink for Nobody {
        fn id(&self) -> u64 {
            0
        }
        fn offer(&self, _: Data, _: Offer) -> (Push, bool) {
            (Push::Queued, false)
        }
        fn wake(&self) {}
    }

    fn entry(sink_id: u64, channel: Channel, tag: u64) -> Entry {
        Entry {
            sink: Arc::new(Nobody),
            sink_id,
            channel,
            needs_snapshot: false,
            pending: None,
            gone: false,
            after: tag,
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Put(u64, bool),
        Remove(u64, bool),
        Gone(Vec<(u64, bool)>),
    }

    fn channel(candles: bool) -> Channel {
        if candles {
            Channel::Candles(Interval::M1)
        } else {
            Channel::Ticks
        }
    }

    proptest! {
        /// Puts (adding or replacing), removals and removals of the gone
        /// agree with a plain map: every subscription is found, with its
        /// latest entry, and nothing else is there.
        #[test]
        fn entries_agree_with_a_map(ops in proptest::collection::vec(prop_oneof![
            (0u64..12, any::<bool>()).prop_map(|(i, c)| Op::Put(i, c)),
            (0u64..12, any::<bool>()).prop_map(|(i, c)| Op::Remove(i, c)),
            proptest::collection::vec((0u64..12, any::<bool>()), 0..6).prop_map(Op::Gone),
        ], 0..200)) {
            let mut e = Entries::default();
            let mut model: BTreeMap<(u64, Channel), u64> = BTreeMap::new();
            for (tag, op) in ops.into_iter().enumerate() {
                let tag = tag as u64;
                match op {
                    Op::Put(id, c) => {
                        e.put(entry(id, channel(c), tag));
                        model.insert((id, channel(c)), tag);
                    }
                    Op::Remove(id, c) => {
                        e.remove(id, channel(c));
                        model.remove(&(id, channel(c)));
                    }
                    Op::Gone(keys) => {
                        for (id, c) in keys {
                            if let Some(x) = e.find(id, channel(c)) {
                                x.gone = true;
                            }
                            model.remove(&(id, channel(c)));
                        }
                        e.remove_gone();
                    }
                }
                prop_assert_eq!(e.len(), model.len());
                for (&(id, ch), &tag) in &model {
                    prop_assert_eq!(e.find(id, ch).map(|x| x.after), Some(tag));
                }
                let mut listed: Vec<_> = e.iter().map(|x| (x.sink_id, x.channel, x.after)).collect();
                listed.sort();
                let want: Vec<_> = model.iter().map(|(&(id, ch), &tag)| (id, ch, tag)).collect();
                prop_assert_eq!(listed, want);
            }
        }
    }
}
